"""Chat with an exported model, streaming its reply token by token.

    python -m zebra.eval.generate artifacts/smollm2_135m/6mla-smart/dpo/model --prompt "What is a zebra?"
    python -m zebra.eval.generate artifacts/smollm2_135m/6mla-smart/dpo/model            # interactive chat
    python -m zebra.eval.generate <dir> --prompt "..." --system "Answer briefly." --temperature 0.7 --top-p 0.9 --seed 1

The prompt is formatted with the tokenizer's own chat template (the one exported with the model); generation
uses the model's own cache (the hybrid's HybridCache: latent KV for MLA layers, conv + SSM state for Mamba2
layers). `--temperature 0` is greedy decoding. In the interactive loop the conversation accumulates; `/reset`
starts a new one, `/exit` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch


def load_chat_model(model_dir: str | Path, dtype: str = "auto", device: str = "auto"):
    """(model in eval mode, tokenizer) of an exported directory; a clear error when it is not one or has no chat
    template."""
    import zebra  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    from zebra.compose.teacher import has_tokenizer_files, load_tokenizer
    from zebra.eval.models import check_model_dir

    path = check_model_dir(model_dir)
    if not has_tokenizer_files(path):
        raise ValueError(f"{path} has no tokenizer files; export the model with its tokenizer")
    tokenizer = load_tokenizer(str(path))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer in {path} has no chat template")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer


def chat_input_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return enc["input_ids"]


def stop_token_ids(tokenizer, model) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus the model's generation-config eos ids."""
    ids = []
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in (source if isinstance(source, (list, tuple)) else [source]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.7,
                 top_p: float = 0.9, top_k: int = 50, seed: int | None = None, repetition_penalty: float = 1.0):
    """Yield the reply to `messages` piece by piece as it is generated (transformers' TextIteratorStreamer, with
    `generate` running in a background thread); an error raised by `generate` is re-raised here."""
    from transformers import TextIteratorStreamer

    input_ids = chat_input_ids(tokenizer, messages).to(model.get_input_embeddings().weight.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if seed is not None:
        torch.manual_seed(seed)
    sample = temperature is not None and temperature > 0
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                  do_sample=sample, streamer=streamer, eos_token_id=stop_token_ids(tokenizer, model),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                  repetition_penalty=repetition_penalty)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # greedy: drop sampling defaults a generation config may carry, so transformers does not warn
        kwargs.update(temperature=None, top_p=None, top_k=None)
    errors = []

    def run():
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for piece in streamer:
        yield piece
    thread.join()
    if errors:
        raise errors[0]


def generate_reply(model, tokenizer, messages: list[dict], out=None, **gen) -> dict:
    """Stream the reply to `out` (default stdout) as it is generated; return {"text", "pieces", "seconds"}."""
    out = out or sys.stdout
    start, pieces = time.perf_counter(), []
    for piece in stream_reply(model, tokenizer, messages, **gen):
        if piece:
            pieces.append(piece)
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()
    return {"text": "".join(pieces), "pieces": len(pieces), "seconds": round(time.perf_counter() - start, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zebra.eval.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="an exported model directory (with its tokenizer)")
    ap.add_argument("--prompt", default=None, help="one user message; without it, an interactive chat")
    ap.add_argument("--system", default=None, help="a system message")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    try:
        model, tokenizer = load_chat_model(args.model_dir, args.dtype, args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               top_k=args.top_k, seed=args.seed, repetition_penalty=args.repetition_penalty)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        generate_reply(model, tokenizer, system + [{"role": "user", "content": args.prompt}], **gen)
        return 0
    history = list(system)
    print(f"chatting with {args.model_dir} (/reset: new conversation, /exit or Ctrl-D: quit)", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("model> ")
        reply = generate_reply(model, tokenizer, history, **gen)
        history.append({"role": "assistant", "content": reply["text"]})
        gen["seed"] = None  # a seed fixes the first reply; later turns continue the same random stream


if __name__ == "__main__":
    raise SystemExit(main())
