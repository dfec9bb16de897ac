"""The generation benchmark's run: per model the check, cache, prefill, decode, profile and largest-batch
measurements (what they are: the package docstring), written to the JSON after each one; and the command line.

    python -m benchmarks.generation                                            # GPU (~3-5 min on an H100)
    python -m benchmarks.generation --smoke --device cpu --out /tmp/gen.json   # tiny shapes, checks the code
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.generation.models import PRESET, RUNNERS, SMOKE_PRESET, load_preset, param_bytes
from benchmarks.generation.report import best_decode, plot, print_summary, summarize
from benchmarks.harness import (GIB, Device, DeviceBroken, copy_bandwidth, ints, is_oom, raise_if_sticky, release,
                                versions)
from zebra.model import ZebraConfig
from zebra.model.ops.dispatch import DECODE_KERNELS, mamba_backend
from zebra.model.ops.triton_util import interpreting
from zebra.utils.files import write_json_atomic

# The graphed static-cache decode vs transformers' eager decode over the same forced tokens: bf16 logits of an
# 8B model differ by a few percent between kernels; a wrong step (stale slot, wrong positions) is off by ~100%.
CHECK_REL_ERR = 0.1

# the Triton kernel only where it can run: a GPU, or Triton's interpreter (set by the tests on CPU machines)
SMOKE_ARGS = dict(kernels="matmul,sdpa,triton" if interpreting() else "matmul,sdpa",
                  contexts="16,40", batch=2, chunk=16, warmup=1, iters=3, max_batch_cap=6, slack=16,
                  check_prompt=12, check_steps=4, bandwidth_mib=16)


# ------------------------------------------------------------------------------------------------ the timed step
class Step:
    """A decode step made replayable: on CUDA warmed up on a side stream and recorded in a CUDA graph
    (`run` replays it); on CPU `run` calls it eagerly."""

    def __init__(self, dev: Device, fn, warmup: int, headroom_check: bool = False, compile: bool = False):
        if compile:
            # torch.compile (inductor) before the capture, so the graph records its fused kernels. Dynamic
            # shapes: the hybrid's cache keeps host-side token counters that a static compile guards on, so it
            # recompiled on every step (CPU, 2026-11-28); a fresh cache means new guards, so start each Step
            # from a reset (a compile cache at its size limit silently falls back to the eager step).
            torch.compiler.reset()
            fn = torch.compile(fn, dynamic=True)
        # `fn` is kept for as long as the graph: a graph reads its inputs by address, and a tensor held only by the
        # step's closure (the base's slot indices) would otherwise be freed after the capture and its memory handed
        # to the next allocation (the base's graphed step read a prefill's activations as its mask: rel_err 1.37)
        self.dev, self.fn, self.graph, self.output = dev, fn, None, None
        if not dev.cuda:
            for _ in range(warmup):
                fn()
            self.run = fn
            return
        stream = torch.cuda.Stream(dev.device)
        stream.wait_stream(torch.cuda.current_stream(dev.device))
        before = dev.allocated()
        torch.cuda.reset_peak_memory_stats(dev.device)
        with torch.cuda.stream(stream):
            for _ in range(max(1, warmup)):
                fn()
        torch.cuda.current_stream(dev.device).wait_stream(stream)
        dev.sync()
        self.activation_bytes = torch.cuda.max_memory_allocated(dev.device) - before
        if headroom_check:
            # The graph's private pool needs about the eager step's activations again; an OOM inside a capture can
            # leave the stream capture in an error state, so refuse up front when it clearly cannot fit.
            dev.free()
            free, _ = torch.cuda.mem_get_info(dev.device)
            if free < 1.25 * self.activation_bytes + 256 * 2 ** 20:
                raise torch.cuda.OutOfMemoryError(
                    f"no headroom to capture the step: {free / GIB:.2f} GiB free, step needs ~"
                    f"{self.activation_bytes / GIB:.2f} GiB")
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn()
        self.run = self.graph.replay

    def time_steps(self, iters: int, warm: int = 2) -> list[float]:
        for _ in range(warm):
            self.run()
        self.dev.sync()
        return [self.dev.time(self.run) for _ in range(iters)]

    def close(self):
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.output = self.run = self.fn = None


# ------------------------------------------------------------------------------------------------ measurements
class Bench:
    def __init__(self, args, results: dict, out: Path | None):
        self.args, self.results, self.out = args, results, out
        self.dev = Device(args.device)
        self.dtype = getattr(torch, args.dtype)

    def save(self):
        if self.out is not None:
            write_json_atomic(self.out, self.results)

    def log(self, model: str, what: str, rec: dict):
        keys = [k for k in ("context", "batch", "kernel", "tokens_per_s", "step_ms", "seconds", "peak_gib",
                            "roofline_fraction", "rel_err", "eager_rel_err", "token_agreement", "per_token", "fits", "error")
                if k in rec and rec[k] is not None]
        parts = []
        for k in keys:
            v = rec[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
        print(f"[{model:5s}] {what:9s} " + " ".join(parts), flush=True)

    def gib(self, n):
        return None if n is None else n / GIB

    # ---- (0) the graph path against the ordinary decode
    def check(self, runner) -> dict:
        """Each decode-attention kernel's graphed static-cache step against transformers' / our eager decode over
        the same forced tokens; `pass` when every kernel's does."""
        a, dev = self.args, self.dev
        b, p, n = 2, a.check_prompt, a.check_steps
        g = torch.Generator(device="cpu").manual_seed(a.seed + 1)
        vocab = runner.config.vocab_size
        prompt = torch.randint(0, vocab, (b, p), generator=g).to(dev.device)
        forced = [torch.randint(0, vocab, (b, 1), generator=g).to(dev.device) for _ in range(n)]
        runner.set_kernel(a.kernels[0])
        ref = torch.cat(runner.reference_decode(prompt, forced), 1).float()
        per_kernel = {}
        for kernel in a.kernels:
            runner.set_kernel(kernel)
            per_kernel[kernel] = self._check_kernel(runner, prompt, forced, ref)
        first = per_kernel[a.kernels[0]]
        out = {"batch": b, "prompt": p, "steps": n, "graph": dev.cuda, "kernel": a.kernels[0],
               "rel_err": first["rel_err"], "token_agreement": first["token_agreement"],
               "finite": all(r["finite"] for r in per_kernel.values()), "kernels": per_kernel,
               "pass": all(r["pass"] for r in per_kernel.values())}
        runner.set_kernel(a.kernels[0])
        return out

    def _check_kernel(self, runner, prompt, forced, ref_l) -> dict:
        a, dev = self.args, self.dev
        b, p, n = prompt.shape[0], prompt.shape[1], len(forced)
        cache = runner.new_cache(b, p + n + a.warmup + 4)
        ids = forced[0].clone()
        pos = torch.full((1,), p, dtype=torch.long, device=dev.device)

        def restart():  # the cache and position right after the prompt's prefill, in place
            runner.reset(cache)
            runner.prefill(cache, prompt, a.chunk)
            runner.set_position(cache, pos, p)

        runner.prefill(cache, prompt, a.chunk)
        step = Step(dev, runner.make_step(cache, ids, pos, greedy=False), a.warmup, compile=a.compile)
        restart()  # the warm-up (and capture) advanced it
        got = []
        for t in forced:
            ids.copy_(t)
            out = step.run()
            got.append((step.output if step.output is not None else out).clone())
        step.close()
        # the same static-cache step run eagerly (no graph): tells a capture problem (host values baked into the
        # graph) from a wrong static-cache path when the graphed step disagrees with the reference
        restart()
        eager_fn = runner.make_step(cache, ids, pos, greedy=False)
        eager = []
        for t in forced:
            ids.copy_(t)
            eager.append(eager_fn().clone())
        got_l, eager_l = torch.cat(got, 1).float(), torch.cat(eager, 1).float()

        def rel(x):
            return ((x - ref_l).norm() / ref_l.norm()).item()

        out = {"rel_err": rel(got_l), "token_agreement": (got_l.argmax(-1) == ref_l.argmax(-1)).float().mean().item(),
               "eager_rel_err": rel(eager_l), "finite": bool(torch.isfinite(got_l).all())}
        out["pass"] = out["finite"] and out["rel_err"] <= CHECK_REL_ERR
        cache = None
        dev.free()
        return out

    # ---- (a) cache bytes per token from allocations
    def cache_bytes(self, runner) -> dict:
        a, dev = self.args, self.dev
        b = a.batch
        lengths = (a.cache_lengths[0], a.cache_lengths[1])
        sizes, parts = [], []
        for n in lengths:
            dev.free()
            dev.sync()
            before = dev.allocated()
            cache = runner.new_cache(b, n)
            dev.sync()
            held = runner.cache_parts(cache)
            sizes.append(dev.allocated() - before if dev.cuda else sum(held.values()))
            parts.append(held)
            del cache
        dev.free()
        per_token = (sizes[1] - sizes[0]) / (lengths[1] - lengths[0]) / b
        constant = (sizes[0] - per_token * lengths[0] * b) / b
        return {"method": "torch.cuda.memory_allocated deltas" if dev.cuda else "tensor nbytes (CPU)",
                "batch": b, "lengths": list(lengths), "allocated": sizes, "tensor_bytes": parts,
                "per_token": per_token, "constant_per_sequence": constant}

    # ---- (b) prefill
    def prefill(self, runner, context: int, batch: int) -> dict:
        a, dev = self.args, self.dev
        rec = {"context": context, "batch": batch, "chunk": a.chunk}
        cache = None
        try:
            dev.free()
            dev.reset_peak()
            ids = torch.randint(0, runner.config.vocab_size, (batch, context), device=dev.device)
            cache = runner.new_cache(batch, context)
            seconds = dev.time(lambda: runner.prefill(cache, ids, a.chunk))
            rec.update(seconds=seconds, tokens_per_s=batch * context / seconds,
                       peak_gib=self.gib(dev.peak()), **{k: v for k, v in runner.cache_parts(cache).items()})
        except Exception as e:
            if not is_oom(e):
                traceback.print_exc()
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            failed = "error" in rec
            cache = None
            dev.free(collect=failed)
        return rec

    # ---- (c) decode over a random cache
    def step_at(self, runner, cache, context: int, batch: int, kernel: str):
        """A greedy decode step over `cache` (filled up to `context`) with `kernel`, from random tokens."""
        runner.set_kernel(kernel)
        ids = torch.randint(0, runner.config.vocab_size, (batch, 1), device=self.dev.device)
        pos = torch.zeros(1, dtype=torch.long, device=self.dev.device)
        runner.set_position(cache, pos, context)
        return runner.make_step(cache, ids, pos)

    def decode(self, runner, context: int, batch: int, kernels, headroom_check=False) -> list[dict]:
        a, dev = self.args, self.dev
        recs, cache = [], None
        try:
            dev.free()
            cache = runner.new_cache(batch, context + a.slack)
            runner.fill_random(cache, context)
            read, written = runner.step_traffic(cache, batch)
            for kernel in kernels:
                rec = {"context": context, "batch": batch, "kernel": kernel, "graph": dev.cuda}
                step = None
                try:
                    dev.reset_peak()  # the peak starts at what is held now: weights and this cache
                    step = Step(dev, self.step_at(runner, cache, context, batch, kernel), a.warmup,
                                headroom_check=headroom_check, compile=a.compile)
                    times = step.time_steps(a.iters)
                    t = statistics.median(times)
                    rec.update(step_ms=t * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
                               tokens_per_s=batch / t, peak_gib=self.gib(dev.peak()),
                               weights_bytes=self.weights, cache_read_bytes=read, cache_written_bytes=written)
                    self.add_roofline(rec, t)
                except Exception as e:
                    raise_if_sticky(e, f"{runner.name} decode at context {context}, batch {batch}, kernel {kernel}")
                    if not is_oom(e):
                        traceback.print_exc()
                    rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                finally:
                    release(dev, step, collect="error" in rec)
                    step = None
                recs.append(rec)
        except DeviceBroken:
            raise
        except Exception as e:  # the cache itself did not fit
            raise_if_sticky(e, f"{runner.name} decode at context {context}, batch {batch}")
            if not is_oom(e):
                traceback.print_exc()
            recs.append({"context": context, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        finally:
            cache = None
            release(dev, None, collect=any("error" in r for r in recs))
        return recs

    def add_roofline(self, rec, seconds):
        bw = self.results.get("bandwidth", {}).get("bytes_per_s")
        moved = rec["weights_bytes"] + rec["cache_read_bytes"] + rec["cache_written_bytes"]
        rec["roofline_bytes"] = moved
        if bw:
            rec["roofline_ms"] = moved / bw * 1e3
            rec["roofline_fraction"] = moved / bw / seconds

    # ---- (d) largest batch at the longest context
    def fits(self, runner, batch: int, context: int) -> dict:
        a, dev = self.args, self.dev
        rec = {"batch": batch, "context": context}
        cache = step = None
        try:
            dev.free()
            dev.reset_peak()
            cache = runner.new_cache(batch, context + a.slack)
            runner.fill_random(cache, context)
            runner.set_kernel(a.kernels[0])
            ids = torch.randint(0, runner.config.vocab_size, (batch, 1), device=dev.device)
            pos = torch.zeros(1, dtype=torch.long, device=dev.device)
            runner.set_position(cache, pos, context)
            step = Step(dev, runner.make_step(cache, ids, pos), 1, headroom_check=True, compile=a.compile)
            step.run()
            dev.sync()
            rec.update(fits=True, peak_gib=self.gib(dev.peak()))
        except Exception as e:
            raise_if_sticky(e, f"{runner.name} fit at context {context}, batch {batch}")
            if not is_oom(e) and batch <= self.args.batch:
                raise  # a failure at a batch that ought to fit is a bug, not memory
            rec.update(fits=False, peak_gib=self.gib(dev.peak()), error=f"{type(e).__name__}: {str(e)[:200]}")
        finally:
            release(dev, step, collect=not rec.get("fits", False))
            cache = step = None
        return rec

    def max_batch(self, runner, context: int, model_res: dict) -> dict:
        a = self.args
        trials = []
        res = {"context": context, "kernel": a.kernels[0], "cap": a.max_batch_cap, "trials": trials}
        model_res["max_batch"] = res

        def trial(b):
            rec = self.fits(runner, b, context)
            trials.append(rec)
            self.log(runner.name, "fit", rec)
            self.save()
            return rec["fits"]

        lo, hi = 0, None
        b = min(a.batch, a.max_batch_cap)
        while True:  # grow x2 until a batch fails (or the cap)
            if trial(b):
                lo = b
                if b >= a.max_batch_cap:
                    break
                b = min(2 * b, a.max_batch_cap)
            else:
                hi = b
                break
        if hi is not None and lo == 0:  # even the first batch failed: search below it
            lo_ok = 0
            lo_, hi_ = 0, hi
            while hi_ - lo_ > 1:
                mid = (lo_ + hi_) // 2
                if trial(mid):
                    lo_ok = lo_ = mid
                else:
                    hi_ = mid
            lo = lo_ok
        else:
            while hi is not None and hi - lo > 1:
                mid = (lo + hi) // 2
                if trial(mid):
                    lo = mid
                else:
                    hi = mid
        res.update(batch=lo, capped=hi is None)
        print(f"[{runner.name:5s}] max batch at {context}: {lo}{' (cap)' if hi is None else ''}", flush=True)
        if lo > 0:
            for attempt in range(3):  # decode there; a slightly smaller batch if the timing run itself OOMs
                bb = max(1, int(lo * (1 - 0.03 * attempt)))
                recs = self.decode(runner, context, bb, a.kernels, headroom_check=True)
                for r in recs:
                    self.log(runner.name, "decode@max", r)
                if any("tokens_per_s" in r for r in recs):
                    res["decode"] = recs
                    break
                res.setdefault("decode_failures", []).extend(recs)
        return res

    # ---- (e) where a decode step's time goes: the eager step under the profiler
    def profile_step(self, runner, context: int, batch: int, kernel: str, steps: int = 3) -> dict:
        """Kernels launched per decode step and the device time of each kind (the graphed step runs the same
        kernels without the launch gaps): the numbers that say which fusion would pay."""
        from torch.profiler import ProfilerActivity, profile

        a, dev = self.args, self.dev
        cache = None
        try:
            dev.free()
            cache = runner.new_cache(batch, context + a.slack)
            runner.fill_random(cache, context)
            step = self.step_at(runner, cache, context, batch, kernel)
            for _ in range(2):
                step()
            dev.sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.cuda else [])
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
                dev.sync()
            rows = []
            for ev in prof.key_averages():
                t = getattr(ev, "device_time_total", None) if dev.cuda else ev.self_cpu_time_total
                if dev.cuda and (getattr(ev, "device_type", None) is None or str(ev.device_type).endswith("CPU")):
                    continue  # CPU-side operators: only the kernels count on the GPU
                if not t:
                    continue
                rows.append({"name": ev.key[:120], "calls_per_step": ev.count / steps, "us_per_step": t / steps})
            rows.sort(key=lambda r: -r["us_per_step"])
            total = sum(r["us_per_step"] for r in rows)
            return {"context": context, "batch": batch, "kernel": kernel, "eager": True,
                    "launches_per_step": sum(r["calls_per_step"] for r in rows), "device_us_per_step": total,
                    "top": rows[:25]}
        finally:
            cache = None
            dev.free()

    # ---- one model, start to end
    def run_model(self, name: str):
        a, dev = self.args, self.dev
        model_res = self.results["models"].setdefault(name, {})
        runner = RUNNERS[name](self.preset, a.device, self.dtype, a.seed)
        try:
            self.weights = param_bytes(runner.model)
            model_res.update(runner.describe())
            model_res.update(weights_bytes=self.weights,
                             params=sum(p.numel() for p in {id(p): p for p in runner.model.parameters()}.values()),
                             allocated_after_load_gib=self.gib(dev.allocated()))
            print(f"[{name:5s}] built: {self.weights / GIB:.2f} GiB of weights", flush=True)
            self.save()
            def section(key, fn):
                """Run one part; an exception is recorded under `errors` and the next part still runs."""
                try:
                    fn()
                except DeviceBroken as e:
                    model_res.setdefault("errors", {})[key] = str(e)
                    print(f"[{name:5s}] stopping: {e}", flush=True)
                    self.results["stopped"] = f"the CUDA context is unusable after: {e}"
                    self.save()
                    raise
                except Exception as e:
                    traceback.print_exc()
                    model_res.setdefault("errors", {})[key] = f"{type(e).__name__}: {str(e)[:500]}"
                    dev.free(collect=True)
                self.save()

            def check():
                model_res["check"] = rec = self.check(runner)
                for kernel, r in rec["kernels"].items():
                    self.log(name, "check", dict(r, kernel=kernel))

            def cache():
                model_res["cache"] = rec = self.cache_bytes(runner)
                self.log(name, "cache", rec)

            def prefill():
                self.prefill(runner, a.contexts[0], a.batch)  # warm-up (kernel compilation / autotuning)
                model_res["prefill"] = []
                for ctx in a.contexts:
                    rec = self.prefill(runner, ctx, a.batch)
                    model_res["prefill"].append(rec)
                    self.log(name, "prefill", rec)
                    self.save()

            def decode():
                model_res["decode"] = []
                for ctx in a.contexts:
                    for rec in self.decode(runner, ctx, a.batch, a.kernels):
                        model_res["decode"].append(rec)
                        self.log(name, "decode", rec)
                    self.save()

            with torch.inference_mode():
                section("check", check)
                section("cache", cache)
                section("prefill", prefill)
                section("decode", decode)
                if a.profile:
                    def prof():
                        # the kernel the step is timed with: the fastest at this context and batch
                        best = best_decode(model_res.get("decode"), a.max_batch_context, a.batch)
                        kernel = best["kernel"] if best else a.kernels[0]
                        model_res["profile"] = rec = self.profile_step(runner, a.max_batch_context, a.batch, kernel)
                        print(f"[{name:5s}] profile   context={rec['context']} batch={rec['batch']} "
                              f"kernel={rec['kernel']} launches/step={rec['launches_per_step']:.0f} "
                              f"device_ms/step={rec['device_us_per_step'] / 1e3:.3f}", flush=True)
                        for r in rec["top"][:12]:
                            print(f"          {r['us_per_step']:9.1f} us {r['calls_per_step']:6.1f}x  {r['name']}",
                                  flush=True)
                    section("profile", prof)
                if not a.skip_max_batch:
                    section("max_batch", lambda: self.max_batch(runner, a.max_batch_context, model_res))
        finally:
            runner.model = runner = None  # free the weights before the next model
            dev.free(collect=True)

    def run(self, preset: dict):
        self.preset = preset
        a = self.args
        print(f"device: {self.results['meta']['device_name']}", flush=True)
        self.results["bandwidth"] = copy_bandwidth(self.dev, a.bandwidth_mib)
        print(f"copy bandwidth: {self.results['bandwidth']['GBps']:.1f} GB/s", flush=True)
        self.save()
        for name in a.models:
            try:
                self.run_model(name)
            except DeviceBroken as e:  # nothing more can run in this process: save and stop, naming the cause
                self.results["summary"] = summarize(self.results, a)
                self.save()
                raise SystemExit(f"generation benchmark stopped: {e}. What was measured is in {self.out}; run what "
                                 "is left (--models, --contexts, --skip-max-batch) in a new process") from e
            except Exception as e:  # record, and still run the other model
                traceback.print_exc()
                self.results["models"].setdefault(name, {})["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            self.results["summary"] = summarize(self.results, a)
            self.save()
        print_summary(self.results["summary"])



# ------------------------------------------------------------------------------------------------ meta
def meta(args, device) -> dict:
    dev = Device(device)
    info = {"versions": versions("transformers", "mamba_ssm", "causal_conv1d", "triton"), "device": device,
            "dtype": args.dtype, "device_name": dev.name(),
            "mamba_backend": mamba_backend(ZebraConfig(), device, getattr(torch, args.dtype)),
            "args": {k: v for k, v in vars(args).items() if k not in ("plot",)},
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if dev.cuda:
        info["device_total_memory_gib"] = dev.total_memory_gib()
    return info


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.generation",
                                 description="Generation benchmark: the hybrid against its Llama base, random "
                                             "weights of the real shapes, one model at a time")
    ap.add_argument("--out", default="experiments/generation/generation_bench.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --smoke on CPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the code, times nothing useful")
    ap.add_argument("--preset", default=str(PRESET), help="conf/model preset (base + mla dims, paper_mla_layers)")
    ap.add_argument("--models", default="zebra,llama")
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens per forward)")
    ap.add_argument("--warmup", type=int, default=3, help="eager decode steps before the capture")
    ap.add_argument("--iters", type=int, default=10, help="timed decode steps (median)")
    ap.add_argument("--kernels", default="matmul,sdpa,triton", help=f"decode attention kernels to time, of {DECODE_KERNELS}")
    ap.add_argument("--max-batch-context", type=int, default=None, help="default: the longest context")
    ap.add_argument("--max-batch-cap", type=int, default=4096)
    ap.add_argument("--skip-max-batch", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile each model's decode step (dynamic shapes) before its graph is captured; "
                         "compiled anew for every cache: slow, use with few contexts / --skip-max-batch")
    ap.add_argument("--profile", action="store_true",
                    help="profile one eager decode step at the max-batch context (kernels per step, time per kind)")
    ap.add_argument("--prefill-targets", default="16384,32768", help="contexts where prefill must match the base")
    ap.add_argument("--cache-lengths", default="4096,32768", help="the two static lengths of the cache measurement")
    ap.add_argument("--slack", type=int, default=64, help="static slots past the context for the decode steps")
    ap.add_argument("--check-prompt", type=int, default=256)
    ap.add_argument("--check-steps", type=int, default=8)
    ap.add_argument("--bandwidth-mib", type=int, default=2048, help="size of the copy-bandwidth buffer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, metavar="JSON", help="only draw the plots of an earlier run (CPU)")
    ap.add_argument("--plot-dir", default="experiments/generation")
    args = ap.parse_args(argv)
    if args.smoke:
        given = set(a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                    if a.startswith("--"))
        for k, v in SMOKE_ARGS.items():
            if k not in given:
                setattr(args, k, v)
        if "cache_lengths" not in given:
            args.cache_lengths = "8,40"
    if args.dtype is None:
        args.dtype = "float32" if args.smoke and args.device == "cpu" else "bfloat16"
    args.models = [m for m in args.models.split(",") if m]
    args.contexts = ints(args.contexts)
    args.kernels = [k for k in str(args.kernels).split(",") if k]
    args.prefill_target_contexts = ints(args.prefill_targets)
    args.cache_lengths = ints(args.cache_lengths)
    if args.max_batch_context is None:
        args.max_batch_context = max(args.contexts)
    for m in args.models:
        if m not in RUNNERS:
            ap.error(f"--models: unknown {m!r} (zebra, llama)")
    for k in args.kernels:
        if k not in DECODE_KERNELS:
            ap.error(f"--kernels: unknown {k!r} {DECODE_KERNELS}")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.plot:
        plot(args.plot, args.plot_dir)
        return None
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a GPU (use --smoke --device cpu to check the code)")
    if args.smoke:
        args.preset = "SMOKE_PRESET (built in)"
    preset = SMOKE_PRESET if args.smoke else load_preset(args.preset)
    threads = torch.get_num_threads()
    if args.smoke and torch.device(args.device).type == "cpu":
        torch.set_num_threads(1)  # tiny ops: more threads only contend (and spin) on a shared machine
    results = {"meta": meta(args, args.device), "preset": preset, "models": {}}
    bench = Bench(args, results, Path(args.out) if args.out else None)
    t0 = time.time()
    try:
        bench.run(preset)
    finally:
        torch.set_num_threads(threads)
    results["meta"]["wall_seconds"] = time.time() - t0
    bench.save()
    print(f"done in {results['meta']['wall_seconds']:.0f} s; wrote {args.out}", flush=True)
    return results


if __name__ == "__main__":
    main()
