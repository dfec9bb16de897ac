"""The teacher's probability mass outside its top-k ids, per token, on heldout.txt and on the shipped SFT text: what a
top-k teacher cache leaves to its one tail bucket (the sparse KD loss does not shape the student's tail).

    .venv/bin/python experiments/teacher_cache/tail_mass.py [--out experiments/teacher_cache/tail_mass.json]

CPU, float32, the embedded teacher (about a minute on 2 cores): 4,096 tokens at most per text, in rows of 512.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from zebra.stages.teacher import load_model_tokenizer, load_teacher_model

SHIPPED = Path(__file__).resolve().parents[2] / "zebra" / "data" / "shipped"
TOP_K = (16, 64, 256, 1024)


def tail_mass(model, ids: torch.Tensor, seq_len: int = 512) -> dict:
    """Mean over tokens of 1 - (teacher mass on its top-k) for each k, and the mean entropy (nats)."""
    tails, entropy = {k: [] for k in TOP_K}, []
    with torch.no_grad():
        for s in range(0, ids.shape[1], seq_len):
            logp = torch.log_softmax(model(ids[:, s:s + seq_len]).logits.float(), -1)[0]
            p = logp.exp()
            top = p.topk(max(TOP_K), dim=-1).values  # sorted, largest first
            for k in TOP_K:
                tails[k].append(1.0 - top[:, :k].sum(-1))
            entropy.append(-(p * logp).sum(-1))
    out = {f"tail_top{k}": round(float(torch.cat(v).mean()), 4) for k, v in tails.items()}
    return {**out, "entropy": round(float(torch.cat(entropy).mean()), 3), "tokens": int(ids.shape[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the result as JSON here")
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()
    teacher = load_teacher_model("smollm2_135m").model.eval()
    tok = load_model_tokenizer("smollm2_135m")
    rows = [json.loads(line) for line in (SHIPPED / "sft.jsonl").read_text().splitlines() if line.strip()]
    texts = {"heldout.txt": (SHIPPED / "heldout.txt").read_text(),
             "sft.jsonl": "\n".join(tok.apply_chat_template(r["messages"], tokenize=False) for r in rows[:80])}
    result = {name: tail_mass(teacher, tok(text, return_tensors="pt").input_ids[:, :args.max_tokens])
              for name, text in texts.items()}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
