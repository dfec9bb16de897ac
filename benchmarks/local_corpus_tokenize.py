"""Tokenising a local corpus: tokens/s of TokenMixtureDataModule.prepare_data on this machine, and the time it
projects for a 20M-token corpus.

A synthetic corpus (documents of words drawn from the shipped SFT set, seeded) is written to a temporary folder as
jsonl: chat conversations (`messages`, formatted with the tokenizer's chat template) and plain text (`text_field`).
Each (format, num_proc) pair tokenises it from a fresh cache; reading into the Arrow cache and tokenising are
timed apart. Nothing is asserted: the numbers are printed and saved.

    python -m benchmarks.local_corpus_tokenize                      # ~2M tokens per format, num_proc 1 and 2
    python -m benchmarks.local_corpus_tokenize --tokens 200000 --num-proc 1 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.harness import versions
from zebra.utils.files import write_json_atomic

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "experiments" / "local_corpus_tokenize" / "results.json"
PROJECT_TOKENS = 20_000_000


def _words() -> list[str]:
    from zebra.data.sources import shipped_path

    words = []
    with open(shipped_path("sft"), encoding="utf-8") as f:
        for line in f:
            for m in json.loads(line)["messages"]:
                words += m["content"].split()
    return words


def write_corpus(folder: Path, fmt: str, words: int, seed: int = 0) -> int:
    """jsonl files of ~`words` words in documents of 50-600 words; returns the document count."""
    rng, vocab = random.Random(seed), _words()
    folder.mkdir(parents=True)
    docs, written, shard = 0, 0, 0
    out = None
    while written < words:
        if docs % 20_000 == 0:  # shards of 20k documents, as a real corpus folder would have
            if out:
                out.close()
            out = open(folder / f"part-{shard:05d}.jsonl", "w", encoding="utf-8")
            shard += 1
        n = rng.randint(50, 600)
        body = " ".join(rng.choices(vocab, k=n))
        if fmt == "chat":
            q = " ".join(rng.choices(vocab, k=rng.randint(5, 30))) + "?"
            row = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": body}]}
        else:
            row = {"text": body}
        out.write(json.dumps(row) + "\n")
        docs, written = docs + 1, written + n
    out.close()
    return docs


def measure(corpus: Path, fmt: str, num_proc: int, tokenizer) -> dict:
    from zebra.data import TokenMixtureDataModule
    from zebra.data.sources import Source

    cache = Path(tempfile.mkdtemp(prefix="zebra-tok-bench-"))
    try:
        spec = {"path": str(corpus)} if fmt == "chat" else {"path": str(corpus), "text_field": "text"}
        t0 = time.perf_counter()
        Source.from_spec(spec).load(cache_dir=cache / "raw")  # the Arrow cache, as prepare_data reads it first
        read_s = time.perf_counter() - t0
        dm = TokenMixtureDataModule(sources=[spec], tokenizer=tokenizer, cache_dir=cache, num_proc=num_proc,
                                    seq_len=2048, batch_size=1)
        t0 = time.perf_counter()
        dm.prepare_data()  # reads the (now cached) Arrow data, tokenises, saves the token cache
        tokenize_s = time.perf_counter() - t0
        dm.setup()
        tokens = int(sum(int(s.lengths.sum()) for s in dm._stores))
        docs = int(sum(len(s) for s in dm._stores))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    total = read_s + tokenize_s
    row = {"format": fmt, "num_proc": num_proc, "documents": docs, "tokens": tokens,
           "read_seconds": round(read_s, 2), "tokenize_seconds": round(tokenize_s, 2),
           "total_seconds": round(total, 2), "tokens_per_second": round(tokens / total),
           "tokenize_tokens_per_second": round(tokens / tokenize_s),
           "projected_minutes_for_20M_tokens": round(PROJECT_TOKENS / (tokens / total) / 60, 2)}
    print(f"{fmt:5s} num_proc={num_proc}: {tokens:,} tokens in {total:.1f} s (read {read_s:.1f} s, tokenise "
          f"{tokenize_s:.1f} s) = {row['tokens_per_second']:,} tokens/s -> 20M tokens in "
          f"{row['projected_minutes_for_20M_tokens']} min", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2_000_000, help="about this many tokens per format")
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--formats", nargs="+", default=["text", "chat"], choices=["text", "chat"])
    ap.add_argument("--tokenizer", default="smollm2_135m")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as train.py sets it: one thread per process
    from zebra.compose.teacher import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    result = {"benchmark": "local_corpus_tokenize", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                          "processor": platform.processor() or platform.machine(),
                          "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
              "tokenizer": args.tokenizer, "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
              "target_tokens": args.tokens, "rows": [],
              "versions": versions("datasets", "tokenizers", "transformers", "pyarrow")}
    work = Path(tempfile.mkdtemp(prefix="zebra-corpus-"))
    try:
        for fmt in args.formats:
            corpus = work / fmt
            # ~1.3 SmolLM2 tokens per word of this text; the count measured is what is reported
            docs = write_corpus(corpus, fmt, int(args.tokens / 1.3))
            size = sum(f.stat().st_size for f in corpus.iterdir())
            print(f"{fmt}: {docs:,} documents, {size / 2**20:.1f} MiB of jsonl", flush=True)
            for n in args.num_proc:
                result["rows"].append({**measure(corpus, fmt, n, tokenizer), "corpus_mib": round(size / 2**20, 1)})
                write_json_atomic(args.out, result)
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
