"""Long-context checks: held-out perplexity against context length, and passkey retrieval.

Training runs at 2048 tokens (the paper) or less (the CPU recipe), while the throughput targets are at 32k, so
this measures what happens to quality beyond the training length, for the teacher and the hybrid alike.

- Perplexity vs length: one span of long held-out text (zebra/data/shipped/heldout.txt followed by the shipped
  SFT conversations, or a given file; `windows` times the largest length) is cut, for each length L, into
  windows of L tokens scored in one forward each, so every length scores the same tokens and differs only in the
  context each prediction sees; reported are the NLL over all positions and over the last quarter of each window
  (`tail`), which is where a model that cannot use long context degrades.
- Passkey: a five-digit key hidden at a given depth in filler text (sentences written for zebra), asked for at
  the end; greedy decoding; correct when the first number generated is the key. Accuracy per length and depth.

CPU (tests): tiny lengths (64..512). GPU, 2k-32k (H100/H200, bf16):

    python -m zebra.eval.long_context --teacher smollm2_135m \\
        --models artifacts/smollm2_135m/6mla-smart/dpo/model \\
        --lengths 2048 4096 8192 16384 32768 --passkey-lengths 2048 4096 8192 16384 32768 \\
        --device cuda --dtype bfloat16 --out artifacts/smollm2_135m/6mla-smart/eval/long_context
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zebra.compose.report import SHIPPED_DIR, _read_text_file

# Filler for the passkey test: plain, unrelated statements (written for zebra).
FILLER = (
    "The morning train left the station exactly on time.",
    "A light wind moved slowly through the tall grass by the river.",
    "The town library stays open until six in the evening on weekdays.",
    "Fresh bread was stacked on wooden shelves near the window of the bakery.",
    "Two boats rested on the quiet lake while clouds drifted overhead.",
    "The old clock in the hall chimed once for every hour of the day.",
    "Children painted pictures of mountains and rivers at the long table.",
    "A gardener watered the roses along the fence before the sun grew hot.",
    "The market sold apples, pears and baskets of small red berries.",
    "Snow covered the hills for most of the winter that year.",
    "A cat slept on the warm stone steps in front of the house.",
    "The bridge over the canal was painted green last spring.",
)
INTRO = ("There is an important pass key hidden in the long text below. Find it and remember it, because you will "
         "be asked for it at the end.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


# ------------------------------------------------------------------------------------------------ long text
def long_text_ids(tokenizer, min_tokens: int, text: str | Path | None = None) -> torch.Tensor:
    """Token ids [N] of long held-out text: the given file/text, else the shipped held-out prose followed by the
    shipped SFT conversations (their message contents). Repeated when shorter than `min_tokens`."""
    if text is None:
        parts = [_read_text_file(p) for p in (SHIPPED_DIR / "heldout.txt", SHIPPED_DIR / "sft.jsonl") if p.is_file()]
        body = "\n\n".join(parts)
    elif isinstance(text, Path) or Path(str(text)).is_file():
        body = _read_text_file(Path(text))
    else:
        body = str(text)
    ids = tokenizer(body, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() == 0:
        raise ValueError("the long-context text is empty")
    if ids.numel() < min_tokens:
        ids = ids.repeat(math.ceil(min_tokens / ids.numel()))
    return ids


def _device_of(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """NLL [T-1] of each next token of one sequence `ids` [T], without materialising [T, V] logits at once."""
    device = _device_of(model)
    hidden = model.model(input_ids=ids[None].to(device), use_cache=False).last_hidden_state[0, :-1]
    targets = ids[1:].to(device)
    out = []
    for h, t in zip(hidden.split(chunk), targets.split(chunk)):
        logits = model.lm_head(h).float()
        out.append(F.cross_entropy(logits, t, reduction="none"))
    return torch.cat(out).cpu()


def perplexity_vs_length(model, ids: torch.Tensor, lengths, windows: int = 2, tail_fraction: float = 0.25) -> list:
    """[{length, windows, tokens, nll, perplexity, tail_nll, tail_perplexity, seconds}] for each length.

    Every length scores the same span of text, `windows` windows of the largest length: at length L it is cut into
    span // L windows of L tokens, each scored on its own, so the lengths differ only in how much context each
    prediction sees. `tail` is the last `tail_fraction` of the positions of each window (the longest contexts).
    """
    lengths = sorted(int(x) for x in lengths)
    span = min(int(windows) * lengths[-1], ids.numel())
    rows = []
    for length in lengths:
        n = span // length
        if n == 0:
            rows.append({"length": length, "windows": 0, "skipped": f"text has only {ids.numel()} tokens"})
            continue
        start = time.perf_counter()
        nlls = [token_nll(model, ids[i * length:(i + 1) * length]) for i in range(n)]
        allnll = torch.cat(nlls)
        tail_from = int((1 - tail_fraction) * (length - 1))
        tail = torch.cat([x[tail_from:] for x in nlls])
        rows.append({"length": length, "windows": n, "tokens": int(allnll.numel()),
                     "nll": float(allnll.mean()), "perplexity": math.exp(float(allnll.mean())),
                     "tail_nll": float(tail.mean()), "tail_perplexity": math.exp(float(tail.mean())),
                     "seconds": round(time.perf_counter() - start, 2)})
    return rows


# ------------------------------------------------------------------------------------------------ passkey
def _filler(n_sentences: int, offset: int = 0) -> str:
    return " ".join(FILLER[(offset + i) % len(FILLER)] for i in range(n_sentences))


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[torch.Tensor, int]:
    """Token ids of a prompt of at most `length` tokens (as close as the filler allows) with the key sentence after
    `depth` (0..1) of the filler; returns (ids, number of filler sentences)."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."

    def build(n: int) -> list[int]:
        before = round(depth * n)
        text = INTRO + _filler(before) + needle + " " + _filler(n - before, offset=before) + QUESTION
        ids = tokenizer(text, add_special_tokens=True).input_ids
        return ids

    lo, hi = 0, 1
    while len(build(hi)) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the largest sentence count that fits
        mid = (lo + hi) // 2
        if len(build(mid)) <= length:
            lo = mid
        else:
            hi = mid
    ids = build(lo)
    if len(ids) > length:
        raise ValueError(f"a passkey prompt needs at least {len(ids)} tokens; length {length} is too short")
    return torch.tensor(ids), lo


@torch.no_grad()
def answer_passkey(model, tokenizer, ids: torch.Tensor, max_new_tokens: int = 8) -> str:
    device = _device_of(model)
    inputs = ids[None].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, inputs.shape[1]:], skip_special_tokens=True)


def passkey_accuracy(model, tokenizer, lengths, depths=DEPTHS, trials: int = 1, seed: int = 0,
                     max_new_tokens: int = 8) -> dict:
    """{"trials": [{length, depth, key, answer, correct, prompt_tokens}], "by_length": {L: acc}, "accuracy"}."""
    rng = random.Random(seed)
    trials_out = []
    for length in sorted(int(x) for x in lengths):
        for depth in depths:
            for _ in range(int(trials)):
                key = rng.randint(10000, 99999)
                ids, _ = passkey_prompt(tokenizer, length, float(depth), key)
                answer = answer_passkey(model, tokenizer, ids, max_new_tokens)
                found = re.search(r"\d+", answer)
                trials_out.append({"length": length, "depth": float(depth), "key": key, "answer": answer.strip(),
                                   "correct": bool(found and found.group(0) == str(key)),
                                   "prompt_tokens": int(ids.numel())})
    by_length = {}
    for length in sorted({t["length"] for t in trials_out}):
        sel = [t["correct"] for t in trials_out if t["length"] == length]
        by_length[str(length)] = sum(sel) / len(sel)
    acc = sum(t["correct"] for t in trials_out) / len(trials_out) if trials_out else None
    return {"trials": trials_out, "by_length": by_length, "accuracy": acc}


# ------------------------------------------------------------------------------------------------ driver
def evaluate_long_context(models: dict, tokenizer, lengths=(256, 512, 1024, 2048), passkey_lengths=(),
                          windows: int = 2, depths=DEPTHS, trials: int = 1, seed: int = 0,
                          text: str | Path | None = None, log=print) -> dict:
    """Both checks for every model in `models` (name -> model); all share `tokenizer`."""
    lengths = sorted(int(x) for x in lengths)
    ids = long_text_ids(tokenizer, max(lengths) * windows if lengths else 0, text) if lengths else None
    out = {"lengths": lengths, "passkey_lengths": sorted(int(x) for x in passkey_lengths), "windows": windows,
           "depths": list(depths), "trials": trials, "models": {}}
    for name, model in models.items():
        res = {}
        if lengths:
            res["perplexity_vs_length"] = perplexity_vs_length(model, ids, lengths, windows)
            log(f"long-context {name}: " + ", ".join(
                f"{r['length']}: {r.get('perplexity', float('nan')):.2f}" for r in res["perplexity_vs_length"]))
        if passkey_lengths:
            res["passkey"] = passkey_accuracy(model, tokenizer, passkey_lengths, depths, trials, seed)
            log(f"passkey {name}: {res['passkey']['by_length']}")
        out["models"][name] = res
    return out


def plot_long_context(result: dict, out_png: str | Path) -> str | None:
    """Perplexity (all positions and tail) against length, and passkey accuracy against length, one line per
    model."""
    from zebra.eval.plots import _plt, save_figure

    plt = _plt()
    models = result.get("models") or {}
    has_ppl = any(m.get("perplexity_vs_length") for m in models.values())
    has_pk = any(m.get("passkey") for m in models.values())
    if not (has_ppl or has_pk):
        return None
    ncols = int(has_ppl) + int(has_pk)
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    col = 0
    if has_ppl:
        ax = axes[0, col]
        col += 1
        for name, m in models.items():
            rows = [r for r in m.get("perplexity_vs_length", []) if r.get("windows")]
            if rows:
                x = [r["length"] for r in rows]
                line, = ax.plot(x, [r["perplexity"] for r in rows], marker="o", label=f"{name} (all)")
                ax.plot(x, [r["tail_perplexity"] for r in rows], marker="x", linestyle="--", color=line.get_color(),
                        label=f"{name} (last quarter)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity")
        ax.set_title("held-out perplexity vs context length")
        ax.legend(fontsize=7)
    if has_pk:
        ax = axes[0, col]
        for name, m in models.items():
            pk = m.get("passkey")
            if pk:
                x = sorted(int(k) for k in pk["by_length"])
                ax.plot(x, [100 * pk["by_length"][str(k)] for k in x], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-5, 105)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("passkey accuracy (%)")
        ax.set_title("passkey retrieval")
        ax.legend(fontsize=7)
    return save_figure(fig, out_png)


def main(argv=None) -> dict:
    from zebra.eval.models import check_same_tokenizer, load_eval_teacher, load_exported

    ap = argparse.ArgumentParser(prog="python -m zebra.eval.long_context", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="smollm2_135m", help="teacher / base (embedded name, GGUF, dir, hub id); "
                    "'none' to skip it")
    ap.add_argument("--models", nargs="*", default=[], help="exported model directories")
    ap.add_argument("--lengths", nargs="*", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--passkey-lengths", nargs="*", type=int, default=[512, 1024, 2048])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--depths", nargs="*", type=float, default=list(DEPTHS), help="where the key sits (0..1)")
    ap.add_argument("--trials", type=int, default=1, help="keys per (length, depth)")
    ap.add_argument("--text", default=None, help="long text file for the perplexity part")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="eval/long_context")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    models, tokenizer = {}, None
    if args.teacher != "none":
        t = load_eval_teacher(args.teacher, dtype=dtype, device=args.device)
        models["teacher"], tokenizer = t.model, t.tokenizer
    for path in args.models:
        m = load_exported(path, dtype=dtype, device=args.device)
        tok = m.tokenizer or tokenizer
        if tokenizer is None:
            tokenizer = tok
        elif m.tokenizer is not None:
            check_same_tokenizer(m.tokenizer, tokenizer, m.source, args.teacher)
        models[str(path)] = m.model
    if not models:
        ap.error("nothing to evaluate: give --models and/or a --teacher")
    result = evaluate_long_context(models, tokenizer, args.lengths, args.passkey_lengths, args.windows,
                                   depths=args.depths, trials=args.trials, text=args.text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(result, indent=1))
    png = plot_long_context(result, out / "long_context.png")
    print(f"wrote {out / 'long_context.json'}" + (f" and {png}" if png else ""))
    return result


if __name__ == "__main__":
    main()
