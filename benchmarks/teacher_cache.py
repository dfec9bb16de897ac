"""KD from a teacher cache vs online KD: step throughput and peak memory, and what building the cache costs.

    python -m benchmarks.teacher_cache                        # one GPU: zebra_1b student, 8B-shaped teacher, seq 2048
    python -m benchmarks.teacher_cache --smoke --device cpu   # tiny shapes on CPU (the code path; times nothing)

Measured, each written to the JSON as it finishes (default experiments/teacher_cache/teacher_cache_bench.json):
- `online`: KDModule.training_step + backward + AdamW with the teacher in memory (the stage's default path).
- `build[k]`: the cache build for k = 16, 64, 256 over `--build-rows` rows: teacher forward, top-k log-probs and tail
  (zebra.stages.teacher_cache.build_shard), and the safetensors shard written to disk; seconds, tokens/s and the
  bytes per token of the written files.
- `cached[k]`: the same step from the cache, after the teacher is freed: each step reads its rows from the shards
  (zebra.stages.teacher_cache.TeacherCache, as KD's DataLoader does), copies them to the device, and runs
  KDModule.training_step on the sparse loss. `speedup` = its tokens/s over online's; peak memory beside online's.
Both KD paths run at the same micro-batch (--batch, or the largest that fits online: the cache only frees memory);
bf16-mixed autocast on CUDA as the stages run, fp32 on CPU. Random weights and random tokens: speed and memory only.
The quality comparison (KD from the cache vs online on a real recipe) is a training run, not this script: see
experiments/teacher_cache/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.harness import GIB, Device, NoTimer, versions
from benchmarks.training.models import build_shapes, build_student, build_teacher, config_summary, make_batch, \
    make_optimizer
from benchmarks.training.run import autocast, batch_candidates, measure, search_batch
from zebra.stages import teacher_cache as tc
from zebra.utils.files import write_json_atomic


def kd_step(module, opt, batch, device, precision, timer):
    """The stage's own training_step (the online or the cached path, whichever the batch asks for), backward and
    the optimizer, as Lightning's automatic optimisation runs them."""
    timer.mark("start")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("You are trying to `self.log()`"))
        with autocast(device, precision):
            loss = module.training_step(batch, 0)
    loss.backward()
    timer.mark("fwd_bwd")
    opt.step()
    opt.zero_grad(set_to_none=True)
    timer.mark("optimizer")
    return loss.detach()


def rows_of(batch: dict) -> list[dict]:
    """A batch as the row items a DataModule's dataset returns (on the host)."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i].cpu() for k, v in batch.items()} for i in range(n)]


def build_cache(teacher, rows: list[dict], k: int, directory: Path, device, batch_size: int) -> dict:
    """The cache of `rows` for top-k, in one shard (as the stage writes it), with a manifest TeacherCache reads."""
    cc = OmegaConf.create({"top_k": k, "logprob_dtype": "bf16", "tail_samples": 0, "seed": 0,
                           "batch_size": batch_size, "chunk_size": None})
    directory.mkdir(parents=True, exist_ok=True)
    Device(device).sync()
    t0 = time.perf_counter()
    tensors = tc.build_shard(teacher, rows, 0, len(rows), cc, 1.0, device)
    Device(device).sync()
    compute = time.perf_counter() - t0
    tc.write_shard(directory / tc.shard_name(0), tensors, f"bench-k{k}", 0, len(rows))
    seconds = time.perf_counter() - t0
    (directory / "manifest.json").write_text(json.dumps({"rows_per_shard": len(rows), "num_rows": len(rows)}))
    tokens = len(rows) * rows[0]["input_ids"].shape[0]
    size = (directory / tc.shard_name(0)).stat().st_size
    return {"rows": len(rows), "tokens": tokens, "seconds": seconds, "compute_seconds": compute,
            "tokens_per_s": tokens / seconds, "file_bytes": size, "bytes_per_token": size / tokens,
            "bytes_per_token_formula": tc.bytes_per_token(k, "bf16")}


def cached_batch(cache: tc.TeacherCache, rows: list[dict], indices: list[int], device) -> dict:
    """What KD's DataLoader gives and Lightning moves to the device: the rows with their cached top-k."""
    items = [{**rows[i], **cache.row(i)} for i in indices]
    batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
    return {key: v.to(device, non_blocking=True) for key, v in batch.items()}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.teacher_cache", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="experiments/teacher_cache/teacher_cache_bench.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, seq 64 (checks the code path; times nothing)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; smoke 64)")
    ap.add_argument("--batch", type=int, default=None, help="fixed micro-batch (default: the largest online fits)")
    ap.add_argument("--max-batch", type=int, default=None, help="largest micro-batch tried (default 16; smoke 2)")
    ap.add_argument("--ks", default="16,64,256", help="top-k sizes of the caches built and trained from")
    ap.add_argument("--build-rows", type=int, default=None, help="rows each cache build covers (default 32; smoke 4)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per measurement (default 3; smoke 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per measurement (default 8; smoke 2)")
    ap.add_argument("--cache-dir", default=None, help="where the caches are written (default: a temporary folder)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.seq = args.seq or (64 if smoke else 2048)
    args.max_batch = args.max_batch or (2 if smoke else 16)
    args.build_rows = args.build_rows or (4 if smoke else 32)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.iters = args.iters or (2 if smoke else 8)
    args.ks = [int(k) for k in str(args.ks).split(",")]
    args.precision = "bf16-mixed" if torch.device(args.device).type == "cuda" else "fp32"
    return args


def main(argv=None) -> dict:
    from zebra.stages.kd import KDModule

    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    dev, t0 = Device(device), time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    shapes = build_shapes(args.smoke)
    vocab = shapes["kd_student"].vocab_size
    if max(args.ks) > vocab:
        raise SystemExit(f"--ks: k = {max(args.ks)} exceeds the vocabulary of {vocab}")
    info = versions("transformers", "lightning", "mamba_ssm", "safetensors")
    info["device"] = dev.name() if dev.cuda else f"cpu ({torch.get_num_threads()} threads)"
    report = {"benchmark": "teacher_cache", "smoke": args.smoke, "args": vars(args), "versions": info,
              "seq_len": args.seq, "precision": args.precision,
              "configs": {k: config_summary(shapes[k]) for k in ("kd_student", "kd_teacher")}}

    def save():
        report["elapsed_s"] = time.perf_counter() - t0
        write_json_atomic(args.out, report)

    teacher = build_teacher(shapes["kd_teacher"], device)
    student = build_student(shapes["kd_student"], device)
    module = KDModule(student, teacher, seq_len=args.seq)
    opt = make_optimizer(module, 8e-5, device)
    report["teacher_weights_gib"] = sum(p.numel() * p.element_size() for p in teacher.parameters()) / GIB
    log(f"device {info['device']}, seq {args.seq}, precision {args.precision}, teacher weights "
        f"{report['teacher_weights_gib']:.2f} GiB")

    # ---------------------------------------------------------------------------------------------- online
    def online_step(b, timer):
        batch, _ = make_batch(b, args.seq, vocab, device, seed=b)
        return kd_step(module, opt, batch, device, args.precision, timer)

    if args.batch:
        mb, tried = args.batch, {"fixed": args.batch}
    else:
        log("online: searching the micro-batch")
        mb, tried = search_batch(lambda b: online_step(b, NoTimer()), batch_candidates(args.max_batch), device, log,
                                 on_oom=lambda: opt.zero_grad(set_to_none=True))
    report["batch_search"], report["micro_batch"] = tried, mb
    if mb is None:
        report["error"] = "micro-batch 1 does not fit online"
        save()
        return report
    tokens = mb * args.seq
    batch, _ = make_batch(mb, args.seq, vocab, device, seed=7)
    report["online"] = measure(lambda timer: kd_step(module, opt, batch, device, args.precision, timer), device,
                               args.warmup, args.iters, tokens, {}, 0.0)
    log(f"online: {report['online']['tokens_per_s']:.0f} tokens/s, peak "
        f"{report['online'].get('peak_mem_gib', float('nan')):.2f} GiB (micro-batch {mb})")
    save()

    # ---------------------------------------------------------------------------------------------- builds
    root = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="teacher-cache-bench-"))
    build_batch, _ = make_batch(args.build_rows, args.seq, vocab, "cpu", seed=11)
    rows = rows_of(build_batch)
    report["build"] = {}
    for k in args.ks:
        res = build_cache(teacher, rows, k, root / f"k{k}", device, batch_size=max(1, mb))
        report["build"][str(k)] = res
        log(f"build k={k}: {res['tokens_per_s']:.0f} tokens/s ({res['seconds']:.2f} s for {res['tokens']} tokens), "
            f"{res['bytes_per_token']:.1f} bytes/token")
        save()

    # ---------------------------------------------------------------------------------------------- cached
    # the teacher goes: KD from the cache never loads it
    module._frozen.clear()
    module.has_teacher = False
    del teacher
    dev.free(collect=True)
    report["allocated_without_teacher_gib"] = dev.allocated() / GIB if dev.cuda else None
    report["cached"] = {}
    picks = [i % len(rows) for i in range(mb)]
    for k in args.ks:
        cache = tc.TeacherCache(root / f"k{k}")

        def step(timer, cache=cache):
            b = cached_batch(cache, rows, picks, device)  # read and copied inside the timed step
            return kd_step(module, opt, b, device, args.precision, timer)

        res = measure(step, device, args.warmup, args.iters, tokens, {}, 0.0)
        res["speedup_vs_online"] = res["tokens_per_s"] / report["online"]["tokens_per_s"]
        if dev.cuda:
            res["peak_mem_saved_gib"] = report["online"]["peak_mem_gib"] - res["peak_mem_gib"]
        report["cached"][str(k)] = res
        log(f"cached k={k}: {res['tokens_per_s']:.0f} tokens/s ({res['speedup_vs_online']:.2f}x online), peak "
            f"{res.get('peak_mem_gib', float('nan')):.2f} GiB")
        save()
    report["summary"] = {
        "card": info["device"], "micro_batch": mb, "seq_len": args.seq,
        "online_tokens_per_s": report["online"]["tokens_per_s"],
        "online_peak_gib": report["online"].get("peak_mem_gib"),
        **{f"k{k}": {"cached_tokens_per_s": report["cached"][str(k)]["tokens_per_s"],
                     "speedup": report["cached"][str(k)]["speedup_vs_online"],
                     "cached_peak_gib": report["cached"][str(k)].get("peak_mem_gib"),
                     "build_tokens_per_s": report["build"][str(k)]["tokens_per_s"],
                     "bytes_per_token": report["build"][str(k)]["bytes_per_token"]} for k in args.ks}}
    save()
    log(f"wrote {args.out}")
    print(f"summary: {json.dumps(report['summary'])}", flush=True)
    return report


if __name__ == "__main__":
    main()
