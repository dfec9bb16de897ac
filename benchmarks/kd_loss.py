"""Benchmark: chunked KD loss vs the naive full-logits loss (memory, time, agreement).

    python -m benchmarks.kd_loss                       # GPU, vocab 128256, seq 2048, batch 4, bf16
    python -m benchmarks.kd_loss --device cpu --smoke  # tiny sizes, checks the script runs anywhere

Peak memory = torch.cuda.max_memory_allocated() during forward + backward of the loss, minus what was
allocated just before the loss call (inputs, weights). The naive loss builds both models' full logits in
bf16, upcasts them to fp32 and calls F.kl_div(..., 'batchmean'); the chunked loss is
`zebra.stages.losses.chunked_kd_loss` with reduction "token" (the same per-token mean).
Student hidden 2048 (zebra_1b) and teacher hidden 4096 (Llama-3.1-8B) by default; the student's LM head
trains (tied embeddings in KD), so weight gradients are part of both measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import Device
from zebra.stages.losses import auto_chunk_size, chunked_kd_loss
from zebra.utils.files import write_json_atomic


def naive_loss(hs, ht, ws, wt):
    zs = (hs @ ws.t()).float()  # full bf16 logits, upcast
    zt = (ht @ wt.t()).float()
    v = zs.shape[-1]
    return F.kl_div(torch.log_softmax(zs.reshape(-1, v), -1), torch.log_softmax(zt.reshape(-1, v), -1),
                    reduction="batchmean", log_target=True)


def chunked_loss(hs, ht, ws, wt, chunk_size):
    loss, _ = chunked_kd_loss(hs, ht, ws, wt, reduction="token", chunk_size=chunk_size)
    return loss


def measure(fn, inputs, dev: Device, weight_grad):
    """Loss, gradients, peak bytes above what was allocated before the call (CUDA), and wall seconds of one
    forward + backward of the loss."""
    hs, ht, ws, wt = inputs
    hs = hs.detach().clone().requires_grad_(True)
    ws = ws.detach().clone().requires_grad_(weight_grad)
    dev.sync()
    dev.free()
    dev.reset_peak()
    before = dev.allocated()
    t0 = time.perf_counter()
    loss = fn(hs, ht, ws, wt)
    loss.backward()
    dev.sync()
    wall = time.perf_counter() - t0
    peak = dev.peak() - before if dev.cuda else None
    out = {"loss": loss.item(), "grad_h": hs.grad.float(), "grad_w": ws.grad.float() if weight_grad else None,
           "peak_bytes": peak, "seconds": wall}
    del loss, hs, ws
    return out


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (vocab 1000, seq 64, batch 2, fp32, chunk 32)")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=2048)
    p.add_argument("--teacher-hidden", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: auto)")
    p.add_argument("--no-weight-grad", action="store_true", help="student LM head frozen")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up)")
    p.add_argument("--full-precision-reduction", action="store_true",
                   help="disallow cuBLAS reduced-precision (bf16) split-K reductions for both losses")
    p.add_argument("--out", default=None,
                   help="JSON path (default experiments/kd_loss_memory/kd_loss_bench.json; smoke runs write only "
                        "when given)")
    a = p.parse_args(argv)
    if a.smoke:
        a.vocab, a.seq, a.batch, a.student_hidden, a.teacher_hidden, a.dtype = 1000, 64, 2, 32, 48, "fp32"
        a.repeats = 1
        a.chunk_size = a.chunk_size or 32  # several chunks even at this size
    device = torch.device(a.device)
    dev = Device(device)
    if a.full_precision_reduction and dev.cuda:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    g = torch.Generator(device=device).manual_seed(0)
    # realistic scales: unit-RMS hidden states (after the final norm) and small head weights
    hs = torch.randn(a.batch, a.seq, a.student_hidden, device=device, dtype=dtype, generator=g)
    ht = torch.randn(a.batch, a.seq, a.teacher_hidden, device=device, dtype=dtype, generator=g)
    ws = (torch.randn(a.vocab, a.student_hidden, device=device, generator=g) * 0.02).to(dtype)
    wt = (torch.randn(a.vocab, a.teacher_hidden, device=device, generator=g) * 0.02).to(dtype)
    chunk = a.chunk_size or auto_chunk_size(a.vocab)
    inputs = (hs, ht, ws, wt)
    wg = not a.no_weight_grad

    results = {}
    for name, fn in [("naive", naive_loss), ("chunked", lambda *x: chunked_loss(*x, chunk_size=chunk))]:
        measure(fn, inputs, dev, wg)  # warm-up (allocator, kernels)
        runs = [measure(fn, inputs, dev, wg) for _ in range(a.repeats)]
        results[name] = runs[-1]
        results[name]["seconds"] = min(r["seconds"] for r in runs)
    n, c = results["naive"], results["chunked"]
    # an fp32 reference (inputs upcast, full fp32 logits) to judge both against: bf16 gradients carry rounding
    # of their own (and cuBLAS may reduce in reduced precision), so naive-vs-chunked alone mixes two errors
    ref = measure(naive_loss, tuple(x.float() for x in inputs), dev, wg)
    report = {
        "device": dev.name(),
        "torch": torch.__version__,
        "vocab": a.vocab, "seq": a.seq, "batch": a.batch, "student_hidden": a.student_hidden,
        "teacher_hidden": a.teacher_hidden, "dtype": a.dtype, "chunk_size": chunk, "weight_grad": wg,
        "naive": {"loss": n["loss"], "peak_bytes": n["peak_bytes"], "seconds": n["seconds"]},
        "chunked": {"loss": c["loss"], "peak_bytes": c["peak_bytes"], "seconds": c["seconds"]},
        "loss_rel_diff": abs(c["loss"] - n["loss"]) / max(abs(n["loss"]), 1e-30),
        "grad_h_rel_err": rel_err(c["grad_h"], n["grad_h"]),
        "grad_w_rel_err": rel_err(c["grad_w"], n["grad_w"]) if wg else None,
        "vs_fp32_reference": {
            "loss": ref["loss"],
            "naive_grad_h_rel_err": rel_err(n["grad_h"], ref["grad_h"]),
            "chunked_grad_h_rel_err": rel_err(c["grad_h"], ref["grad_h"]),
            "naive_grad_w_rel_err": rel_err(n["grad_w"], ref["grad_w"]) if wg else None,
            "chunked_grad_w_rel_err": rel_err(c["grad_w"], ref["grad_w"]) if wg else None,
        },
        "cuda_bf16_reduced_precision_reduction":
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction if dev.cuda else None,
    }
    if n["peak_bytes"]:
        report["peak_ratio"] = c["peak_bytes"] / n["peak_bytes"]
    report["pass"] = {
        "memory<=25%": (report.get("peak_ratio", 0.0) <= 0.25) if n["peak_bytes"] else None,
        "loss<=1e-4": report["loss_rel_diff"] <= 1e-4,
        "grad<=1e-3": report["grad_h_rel_err"] <= 1e-3,
    }
    print(json.dumps(report, indent=2))
    out = a.out or (None if a.smoke else "experiments/kd_loss_memory/kd_loss_bench.json")
    if out:
        write_json_atomic(out, report)
        print(f"saved {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
