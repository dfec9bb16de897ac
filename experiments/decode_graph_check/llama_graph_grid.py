"""Which setting makes the base's graphed decode step disagree? (generation benchmark, 2026-11-28: the graphed
static-cache step of the Llama-3.1-8B-shaped base had rel_err 1.37 against transformers' eager decode for every
attention kernel while the same step run eagerly agreed; a small-shape probe (since replaced by
llama_graph_trace.py) with one warm-up step and a 12-token prompt replayed exactly.)

This runs the benchmark's own check (`Bench.check`: reference decode, graphed step, eager step) over a grid of
the settings that differ between the two: the preset (smoke / the real 8B shape), the warm-up steps before the
capture (1 / 3), the prompt length (12 / 256) and inference mode (on, as the benchmark runs / off, as the probe).
One line each; one call, about a minute on one GPU:

    source .gpu/bootstrap.sh && python experiments/decode_graph_check/llama_graph_grid.py [--out grid.json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.generation import run as G  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--kernels", default="matmul")
    ap.add_argument("--presets", default="smoke,full")
    ap.add_argument("--device", default="cuda")
    cli = ap.parse_args()
    rows = []
    for name in cli.presets.split(","):
        preset = G.SMOKE_PRESET if name == "smoke" else G.load_preset(G.PRESET)
        runner = None
        for inference, warmup, prompt in itertools.product((True, False), (1, 3), (12, 256)):
            args = G.parse_args(["--device", cli.device, "--kernels", cli.kernels, "--warmup", str(warmup),
                                 "--check-prompt", str(prompt), "--out", ""])
            bench = G.Bench(args, {}, None)
            if runner is None:
                runner = G.RUNNERS["llama"](preset, cli.device, torch.bfloat16, 0)
            with torch.inference_mode() if inference else contextlib.nullcontext():
                res = bench.check(runner)
            row = {"preset": name, "inference_mode": inference, "warmup": warmup, "prompt": prompt,
                   **{k: {kk: res["kernels"][k][kk] for kk in ("rel_err", "eager_rel_err", "token_agreement")}
                      for k in res["kernels"]}}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if cli.out:
        Path(cli.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
