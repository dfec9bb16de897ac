"""Where the hybrid's decode step goes at its largest batch (zebra_8b, 32k context), and the launch settings of the
decode-attention kernels (results and the defaults they chose: this folder's README).

1. The absorbed MLA attention alone at that shape (q [B, 1, heads, r_kv + d_rope] against the latent cache, v a
   prefix view of k, the static mask [1, 1, 1, S]): the matmul path and the Triton kernel over launch settings,
   each timed (CUDA events, median) and as GB/s of cache read once.
2. One eager decode step of the whole hybrid at that batch under the profiler: device time per kernel kind.
3. (--latent-sweep) The latent kernel (values read inside the keys) over launch settings at batch 8 and the
   largest batch, beside the matmul path and the general kernel.
0. (first) The Triton kernel's ranges combined by its combine kernel vs by torch ops, at batch 8, 64 and that
   batch (--combine-only: just this).

    source .gpu/bootstrap.sh
    python experiments/decode_attention/decode_large_batch.py --out $OUT/decode_large_batch.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.generation import run as G  # noqa: E402
from zebra.model.ops.flash_decode import flash_decode  # noqa: E402
from zebra.model.ops.decode_attention import decode_attention  # noqa: E402


def timed(fn, iters=5, calls=10):
    """Median seconds of one fn() call: `calls` calls recorded in one CUDA graph (as the decode step runs them:
    timed eagerly, a call of a few tens of microseconds measures the host's launch latency instead), the graph's
    replays timed with the benchmark's CUDA-event timer."""
    dev = G.Device("cuda")

    def repeated():
        for _ in range(calls):
            fn()

    step = G.Step(dev, repeated, warmup=2)
    try:
        return statistics.median(step.time_steps(iters)) / calls
    finally:
        step.close()


def mla_inputs(batch, context, heads=32, r=160, dr=64, slack=64):
    """zebra_8b's absorbed MLA decode attention: q [B, 1, heads, r_kv + d_rope] against the latent cache entries
    (k [B, 1, S, r_kv + d_rope], v its first r_kv columns, a view), the static mask over context + slack slots."""
    s = context + slack
    entries = torch.randn(batch, s, r + dr, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, 1, heads, r + dr, device="cuda", dtype=torch.bfloat16)
    mask = (torch.arange(s, device="cuda") <= context)[None, None, None, :]
    return q, entries[:, None], entries[:, None, :, :r], mask, (128 + 64) ** -0.5


def attention(batch, context, rows_file=None, grid=None, latent=False):
    """The matmul path, both Triton kernels at their defaults, then `latent` (or the general) kernel over `grid`."""
    q, k, v, mask, scale = mla_inputs(batch, context)
    cache_bytes = k.numel() * k.element_size()
    ref = decode_attention(q, k, v, mask, scale, "matmul").float()
    rows = []

    def add(name, fn, **cfg):
        try:
            out = fn().float()
            err = ((out - ref).norm() / ref.norm()).item()
            t = timed(fn)
            rows.append({"kernel": name, "batch": batch, **cfg, "ms": t * 1e3, "GBps": cache_bytes / t / 1e9,
                         "rel_err": err})
        except Exception as e:  # a launch setting that does not compile (registers / shared memory)
            rows.append({"kernel": name, "batch": batch, **cfg, "error": f"{type(e).__name__}: {str(e)[:160]}"})
        print(json.dumps(rows[-1]), flush=True)
        if rows_file:  # one line per setting as it is measured: a call stopped at its limit keeps what ran
            with open(rows_file, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")

    add("matmul", lambda: decode_attention(q, k, v, mask, scale, "matmul"))
    add("triton-default", lambda: flash_decode(q, k, v, mask, scale, latent=False))
    add("latent-default", lambda: flash_decode(q, k, v, mask, scale, latent=True))
    name = "latent" if latent else "triton"
    for bs, nw, ns, sp in grid or itertools.product((16, 32, 64), (4, 8), (2, 3), (None, 2, 4)):
        add(name, lambda: flash_decode(q, k, v, mask, scale, sp, block_s=bs, num_warps=nw, num_stages=ns,
                                       latent=latent), block_s=bs, num_warps=nw, num_stages=ns, splits=sp)
    return {"batch": batch, "context": context, "cache_bytes": cache_bytes, "rows": rows}


def combine_ab(batch, context):
    """The Triton kernel with its ranges combined by the combine kernel vs by torch ops, same launch otherwise."""
    q, k, v, mask, scale = mla_inputs(batch, context)
    fused = timed(lambda: flash_decode(q, k, v, mask, scale), iters=20)
    torch_ops = timed(lambda: flash_decode(q, k, v, mask, scale, torch_combine=True), iters=20)
    diff = (flash_decode(q, k, v, mask, scale).float() - flash_decode(q, k, v, mask, scale, torch_combine=True)
            .float()).abs().max().item()
    rec = {"batch": batch, "context": context, "combine_kernel_ms": fused * 1e3, "torch_combine_ms": torch_ops * 1e3,
           "max_abs_diff": diff}
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=739)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--attention-batch", type=int, default=739, help="batch of the attention-only sweep")
    ap.add_argument("--out", default=None)
    ap.add_argument("--combine-only", action="store_true", help="only the combine A/B (batch 8 and the largest)")
    ap.add_argument("--small-batch-sweep", metavar="JSONL", default=None,
                    help="only the attention sweep at --attention-batch over the small-batch grid (range counts 16-64 "
                         "and the automatic one), one JSON line per setting appended to JSONL")
    ap.add_argument("--latent-sweep", metavar="JSONL", default=None,
                    help="only the latent kernel's launch sweep at batch 8 and --batch, one JSON line per setting")
    cli = ap.parse_args()
    res = {"device": torch.cuda.get_device_name()}
    if cli.latent_sweep:
        with torch.inference_mode():
            # (block_s, warps, stages, splits); decode_latent_sweep_h200.jsonl names the kernel "latent-t" (the
            # transposed form, now the only one, beside the untransposed "latent")
            for batch, splits in ((8, (None, 16)), (cli.batch, (None,))):
                grid = itertools.product((64, 128), (4, 8), (3, 4), splits)
                attention(batch, cli.context, rows_file=cli.latent_sweep, grid=grid, latent=True)
                torch.cuda.empty_cache()
        return
    if cli.small_batch_sweep:
        grid = itertools.product((64, 32), (4, 8), (2, 3), (None, 64, 32, 16))
        with torch.inference_mode():
            attention(cli.attention_batch, cli.context, rows_file=cli.small_batch_sweep, grid=grid)
        return
    with torch.inference_mode():
        res["combine"] = [combine_ab(b, cli.context) for b in (8, 64, cli.batch)]
        torch.cuda.empty_cache()
        if cli.out:
            Path(cli.out).write_text(json.dumps(res, indent=1))
        if cli.combine_only:
            return
        res["attention"] = attention(cli.attention_batch, cli.context)
        torch.cuda.empty_cache()
        if cli.out:
            Path(cli.out).write_text(json.dumps(res, indent=1))
        args = G.parse_args(["--device", "cuda", "--kernels", "matmul", "--out", ""])
        bench = G.Bench(args, {}, None)
        runner = G.RUNNERS["zebra"](G.load_preset(G.PRESET), "cuda", torch.bfloat16, 0)
        res["profile"] = {}
        for kernel in ("matmul", "triton"):
            rec = bench.profile_step(runner, cli.context, cli.batch, kernel, steps=2)
            res["profile"][kernel] = rec
            print(f"profile {kernel}: batch {rec['batch']} device ms/step {rec['device_us_per_step'] / 1e3:.1f} "
                  f"launches {rec['launches_per_step']:.0f}", flush=True)
            for r in rec["top"][:14]:
                print(f"  {r['us_per_step'] / 1e3:8.2f} ms {r['calls_per_step']:6.1f}x  {r['name'][:110]}", flush=True)
            if cli.out:
                Path(cli.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
