"""Generation benchmark: the hybrid (ZebraForCausalLM, zebra_8b paper mix) against its Llama-3.1-8B-shaped base
(transformers' LlamaForCausalLM), random weights of the real shapes, bf16, one CUDA GPU, one model at a time.

    python -m benchmarks.generation --out experiments/generation_bench.json       # GPU (~3-5 min on an H100)
    python -m benchmarks.generation --smoke --device cpu --out /tmp/gen.json      # tiny shapes, checks the code
    python -m benchmarks.generation --plot experiments/generation_bench.json --plot-dir experiments/

Per model, in this order (the JSON is rewritten after every measurement, so a timeout still leaves results):
  check     graph-replayed static-cache decode against the ordinary eager decode (dynamic cache) on a short
            prompt: relative logit error and greedy-token agreement.
  cache     cache bytes per token from allocator deltas (torch.cuda.memory_allocated around creating the static
            cache at two lengths; tensor sizes on CPU). The hybrid's constant part (Mamba2 conv + SSM states)
            is per sequence and reported separately.
  prefill   chunked prefill into a static cache (logits_to_keep=1), batch 8, at each context; CUDA-event timed,
            peak memory (max_memory_allocated, reset per measurement).
  decode    batch 8 at each context over a static cache filled with random values at that length (no prefill):
            a one-token greedy step (argmax fed back on the device, position advanced in place) recorded in a
            CUDA graph and replayed; median step time over the timed replays; once per decode-attention kernel
            ("matmul", "sdpa": zebra.model.mla.decode_attention, used by both models), best reported.
  max batch the largest batch whose cache and captured decode step fit at the longest context (grow x2, then
            bisect), and decode tokens/s there.
  roofline  bytes a decode step must move (every weight once, the whole static cache read, the Mamba2 states
            written back) over the measured device copy bandwidth (2 x bytes / time of a large copy): the
            achieved fraction is reported for both models, and the ratios are flagged unreportable when the
            base is below 60% of its roofline.

Both models run the same harness and the same capture: a manual torch.cuda.CUDAGraph of one decode step with
static input buffers (warm-up on a side stream first; with --compile the step goes through torch.compile before
it). The base decodes through transformers' StaticCache
(which writes at its own device-side length) with a prepared 4D mask over the slots; its attention function
is registered with transformers' AttentionInterface: prefill goes to transformers' own SDPA attention, a
one-token step to the same decode attention the hybrid's absorbed MLA uses (transformers' SDPA path would
otherwise copy the whole KV cache to 32 heads every step, repeat_kv).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import inspect
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from zebra.utils.files import write_json_atomic
from zebra.model import ZebraConfig, ZebraForCausalLM
from zebra.model.cache import measure_cache_bytes
from zebra.model.mla import DECODE_KERNELS, MultiHeadLatentAttention, decode_attention
from zebra.model.triton_util import interpreting
from zebra.utils.paths import model_preset_file

PRESET = model_preset_file("zebra_8b")
ATTN_NAME = "zebra_bench"  # the base's attention implementation name (registered below)
GIB = 2 ** 30
# The graphed static-cache decode vs transformers' eager decode over the same forced tokens: bf16 logits of an
# 8B model differ by a few percent between kernels; a wrong step (stale slot, wrong positions) is off by ~100%.
CHECK_REL_ERR = 0.1

# Tiny shapes for --smoke (the same code path; numbers mean nothing).
SMOKE_PRESET = {
    "name": "smoke",
    "base": dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 max_position_embeddings=4096,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 256}),
    "mla": dict(q_lora_rank=64, kv_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                mla_rope="pairs", mamba_chunk_size=16),
    "paper_mla_layers": [0, 2],
}
# the Triton kernel only where it can run: a GPU, or Triton's interpreter (set by the tests on CPU machines)
SMOKE_ARGS = dict(kernels="matmul,sdpa,triton" if interpreting() else "matmul,sdpa",
                  contexts="16,40", batch=2, chunk=16, warmup=1, iters=3, max_batch_cap=6, slack=16,
                  check_prompt=12, check_steps=4, bandwidth_mib=16)


# ------------------------------------------------------------------------------------------------ configs
def load_preset(path: str | Path) -> dict:
    """The `base`, `mla` and `paper_mla_layers` blocks of a conf/model preset as plain dicts."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(path)
    return {"name": str(node.get("name", Path(path).stem)),
            "base": OmegaConf.to_container(node["base"], resolve=True),
            "mla": OmegaConf.to_container(node["mla"], resolve=True),
            "paper_mla_layers": list(node["paper_mla_layers"])}


def zebra_config(preset: dict) -> ZebraConfig:
    from zebra.plan.describe import zebra_config_from_preset
    from zebra.plan.mixes import layer_types_for

    n = int(preset["base"]["num_hidden_layers"])
    return zebra_config_from_preset(preset, layer_types_for(n, preset["paper_mla_layers"]))


def llama_config(preset: dict):
    from transformers import LlamaConfig

    base = {k: v for k, v in preset["base"].items() if k not in ("bos_token_id", "eos_token_id")}
    return LlamaConfig(**base, attn_implementation="sdpa")  # switched to ATTN_NAME once built (LlamaRunner)


# ------------------------------------------------------------------------------------------------ base attention
def _bench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function of the base: its SDPA attention, except a one-token step with a prepared
    bool mask [B|1, 1, 1, S] over the static slots, which runs `decode_attention` with the query heads folded
    per KV head (query [B, h, 1, d] -> [B, g, h/g, d] against key/value [B, g, S, d]: no repeat_kv copy)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, _, d = query.shape
    g = key.shape[1]
    q = query.reshape(b, g, h // g, d)
    out = decode_attention(q, key, value, attention_mask, scaling, _bench_attention.kernel)  # [B, g, h/g, d]
    return out.reshape(b, 1, h, d), None  # transformers wants [B, T, heads, d]


_bench_attention.kernel = "matmul"


def register_base_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _bench_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


# ------------------------------------------------------------------------------------------------ runners
def _build(cls_or_fn, device, dtype, seed):
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bf16 on the device: no fp32 copy of 8B parameters
    try:
        with torch.device(device):
            model = cls_or_fn()
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


class ZebraRunner:
    name = "zebra"

    def __init__(self, preset, device, dtype, seed):
        self.config = zebra_config(preset)
        self.model = _build(lambda: ZebraForCausalLM(self.config), device, dtype, seed)
        self.device, self.dtype = torch.device(device), dtype
        self.mla_modules = [m for m in self.model.modules() if isinstance(m, MultiHeadLatentAttention)]

    def describe(self) -> dict:
        c = self.config
        return {"class": "zebra.model.ZebraForCausalLM", "config": c.to_dict(), "mla_layers": c.mla_layers,
                "expected": measure_cache_bytes(c, dtype=self.dtype)}

    def new_cache(self, batch, max_length):
        return self.model.make_cache(batch, max_length=max_length)

    def cache_parts(self, cache) -> dict:
        """{kind: bytes} of the tensors the cache holds."""
        return {f"{k}_bytes": v for k, v in cache.nbytes_by_kind().items()}

    def step_traffic(self, cache, batch) -> tuple[int, int]:
        """(bytes read, bytes written) of the cache in one decode step: every slot is read (masked or not);
        Mamba2 states are rewritten, MLA gets one entry per row and layer."""
        parts = cache.nbytes_by_kind()
        elem = torch.finfo(self.dtype).bits // 8
        written = parts["mamba"] + batch * self.config.mla_cache_dim * elem * len(self.config.mla_layers)
        return parts["mla"] + parts["mamba"], written

    def fill_random(self, cache, length):
        for layer in cache.layers:
            for t in layer.tensors():
                t.normal_()
            layer.length = length
        cache.seen_tokens = length

    def reset(self, cache):
        for layer in cache.layers:
            for t in layer.tensors():
                t.zero_()
            layer.length = 0
        cache.seen_tokens = 0

    def set_position(self, cache, pos, length):
        pos.fill_(length)

    def prefill(self, cache, ids, chunk):
        out = None
        for s in range(0, ids.shape[1], chunk):
            out = self.model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits

    def set_kernel(self, kernel):
        for m in self.mla_modules:
            m.decode_attention = kernel

    def make_step(self, cache, ids, pos, greedy=True):
        """One decode token through the static path: reads `ids` [B, 1] and `pos` [1] (device tensors), returns
        logits [B, 1, V]; greedy feeds the argmax back into `ids`; `pos` is advanced in place."""
        model = self.model

        def step():
            logits = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True,
                           logits_to_keep=1).logits
            if greedy:
                ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
            pos.add_(1)
            return logits

        return step

    def reference_decode(self, prompt, tokens):
        """Eager decode through the ordinary path (dynamic HybridCache): logits of each forced token."""
        cache = self.model.make_cache(prompt.shape[0])
        self.model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return [self.model(input_ids=t, past_key_values=cache, use_cache=True).logits for t in tokens]


class LlamaRunner:
    name = "llama"

    def __init__(self, preset, device, dtype, seed):
        from transformers import LlamaForCausalLM

        register_base_attention()
        self.config = llama_config(preset)
        self.model = _build(lambda: LlamaForCausalLM(self.config), device, dtype, seed)
        self.model.config._attn_implementation = ATTN_NAME
        self.device, self.dtype = torch.device(device), dtype
        self.g, self.hd = self.config.num_key_value_heads, self.config.head_dim
        # transformers releases differ in how a StaticCache learns where to write: recent ones keep a device-side
        # length per layer (`cumulative_length`, advanced by every update), earlier ones take the model's
        # `cache_position` argument. Both are driven here from the same device position tensor.
        self.pass_cache_position = "cache_position" in inspect.signature(type(self.model.model).forward).parameters

    def describe(self) -> dict:
        return {"class": "transformers.LlamaForCausalLM", "config": self.config.to_dict(),
                "attention": f"{ATTN_NAME}: transformers sdpa (prefill) + zebra.model.mla.decode_attention (decode)"}

    def new_cache(self, batch, max_length):
        from transformers import StaticCache

        cache = StaticCache(config=self.config, max_cache_len=max_length)
        if hasattr(cache, "early_initialization"):
            cache.early_initialization(batch_size=batch, num_heads=self.g, head_dim=self.hd, dtype=self.dtype,
                                       device=self.device)
        else:  # allocate now (not lazily inside the first update), so the allocation can be measured
            empty = torch.zeros(batch, self.g, 0, self.hd, dtype=self.dtype, device=self.device)
            for layer in cache.layers:
                layer.lazy_initialization(empty)
        return cache

    @staticmethod
    def _set_length(layer, length):
        length_now = getattr(layer, "cumulative_length", None)
        if isinstance(length_now, torch.Tensor):
            length_now.fill_(length)

    def _kv(self, cache):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]

    def cache_parts(self, cache) -> dict:
        return {"kv_bytes": sum(t.numel() * t.element_size() for t in self._kv(cache))}

    def step_traffic(self, cache, batch) -> tuple[int, int]:
        kv = self._kv(cache)
        read = sum(t.numel() * t.element_size() for t in kv)
        written = sum(batch * t.shape[1] * t.shape[3] * t.element_size() for t in kv)
        return read, written

    def fill_random(self, cache, length):
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            self._set_length(layer, length)

    def reset(self, cache):
        cache.reset()

    def set_position(self, cache, pos, length):
        pos.fill_(length)
        for layer in cache.layers:
            self._set_length(layer, length)

    def prefill(self, cache, ids, chunk):
        out = None
        for s in range(0, ids.shape[1], chunk):
            out = self.model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits

    def set_kernel(self, kernel):
        _bench_attention.kernel = kernel

    def make_step(self, cache, ids, pos, greedy=True):
        """As ZebraRunner.make_step. The StaticCache writes at its own device-side length (advanced by every
        update); `pos` mirrors it for the RoPE positions and the mask over the slots."""
        model, b = self.model, ids.shape[0]
        slots = torch.arange(cache.layers[0].max_cache_len, device=ids.device)
        extra = {"cache_position": pos} if self.pass_cache_position else {}

        def step():
            mask = (slots <= pos)[None, None, None, :]  # [1, 1, 1, S]: slots written so far, this one included
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos.view(1, 1).expand(b, 1),
                           past_key_values=cache, use_cache=True, logits_to_keep=1, **extra).logits
            if greedy:
                ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
            pos.add_(1)
            return logits

        return step

    def reference_decode(self, prompt, tokens):
        """transformers' ordinary eager decode (DynamicCache, sdpa attention)."""
        from transformers import DynamicCache

        self.model.config._attn_implementation = "sdpa"
        try:
            cache = DynamicCache(config=self.config)
            self.model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return [self.model(input_ids=t, past_key_values=cache, use_cache=True).logits for t in tokens]
        finally:
            self.model.config._attn_implementation = ATTN_NAME


RUNNERS = {"zebra": ZebraRunner, "llama": LlamaRunner}


# ------------------------------------------------------------------------------------------------ device helpers
class Device:
    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self):
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def free(self, collect: bool = False):
        """Return cached blocks to the driver; `collect` also runs the garbage collector first (after an
        exception, whose traceback frames can keep tensors alive in reference cycles)."""
        if collect:
            gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def time(self, fn) -> float:
        """Seconds of fn() (CUDA events on GPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# CUDA errors that leave the context unusable: every later kernel of the process fails with them too
STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "unspecified launch failure",
                      "device-side assert", "CUBLAS_STATUS_EXECUTION_FAILED", "illegal instruction")


class DeviceBroken(RuntimeError):
    """A sticky CUDA error: the benchmark stops (what was measured is saved) instead of recording the same error
    for every later measurement."""


def is_sticky(e: BaseException) -> bool:
    return not is_oom(e) and any(m.lower() in str(e).lower() for m in STICKY_CUDA_ERRORS)


def raise_if_sticky(e: BaseException, where: str) -> None:
    if is_sticky(e):
        raise DeviceBroken(f"{where}: {type(e).__name__}: {str(e)[:300]}") from e


def release(dev, step, collect: bool) -> None:
    """Frees what a measurement held. After a sticky CUDA error these calls fail as well: that failure must not
    replace the error being raised (the next device call reports it anyway)."""
    try:
        if step is not None:
            step.close()
        dev.free(collect=collect)
    except Exception as e:
        if not is_sticky(e):
            raise


def copy_bandwidth(dev: Device, mib: int, iters: int = 10) -> dict:
    """Device-to-device copy bandwidth: 2 x bytes / time of dst.copy_(src) (read + write), median."""
    n = mib * 2 ** 20
    src = torch.empty(n, dtype=torch.uint8, device=dev.device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    dev.sync()
    times = [dev.time(lambda: dst.copy_(src)) for _ in range(iters)]
    src = dst = None
    dev.free()
    t = statistics.median(times)
    return {"bytes": n, "seconds": t, "bytes_per_s": 2 * n / t, "GBps": 2 * n / t / 1e9}


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


# ------------------------------------------------------------------------------------------------ summary
TARGETS = {"decode_ratio_batch": 2.5, "max_batch_ratio": 10.0, "max_batch_decode_ratio": 10.0, "prefill_ratio": 1.0,
           "base_roofline_fraction": 0.6, "kv_fraction_rel_err": 0.01}


def best_decode(recs, context, batch):
    ok = [r for r in recs or [] if r.get("context") == context and r.get("batch") == batch and "tokens_per_s" in r]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def summarize(results: dict, args) -> dict:
    models = results.get("models", {})
    z, l = models.get("zebra", {}), models.get("llama", {})
    out: dict = {"checks": {}}
    checks = out["checks"]

    def check(name, value, target, higher=True, reportable=True):
        if value is None:
            return
        ok = value >= target if higher else value <= target
        checks[name] = {"value": value, "target": target, "pass": bool(ok), "reportable": reportable}

    # cache bytes: the hybrid's per-token bytes over the base's, against kv_fraction of the config
    zc, lc = z.get("cache"), l.get("cache")
    if zc and lc:
        measured = zc["per_token"] / lc["per_token"]
        expected = z.get("expected", {}).get("kv_fraction")
        out["kv_fraction"] = {"measured": measured, "expected": expected,
                              "hybrid_bytes_per_token": zc["per_token"], "base_bytes_per_token": lc["per_token"],
                              "hybrid_state_bytes_per_sequence": zc["constant_per_sequence"]}
        if expected:
            rel = abs(measured - expected) / expected
            out["kv_fraction"]["rel_err"] = rel
            check("kv_fraction_rel_err", rel, TARGETS["kv_fraction_rel_err"], higher=False)

    ctx, b = args.max_batch_context, args.batch
    lb, zb = best_decode(l.get("decode"), ctx, b), best_decode(z.get("decode"), ctx, b)
    gate = None
    if lb and "roofline_fraction" in lb:
        gate = lb["roofline_fraction"] >= TARGETS["base_roofline_fraction"]
        check("base_roofline_fraction", lb["roofline_fraction"], TARGETS["base_roofline_fraction"])
    out["base_reaches_roofline_gate"] = gate
    # a decode step that disagrees with the model's ordinary forward measures nothing worth comparing
    out["decode_checks_pass"] = {m: (models.get(m, {}).get("check") or {}).get("pass") for m in ("zebra", "llama")}
    reportable = bool(gate) and all(out["decode_checks_pass"].values())
    out["roofline_fraction"] = {m: {f"{r['context']}": r.get("roofline_fraction")
                                    for r in (models.get(m, {}).get("decode") or [])
                                    if r.get("batch") == b and r is best_decode(models[m]["decode"], r["context"], b)}
                                for m in ("zebra", "llama") if m in models}
    if lb and zb:
        ratio = zb["tokens_per_s"] / lb["tokens_per_s"]
        roof = (lb["roofline_bytes"] / zb["roofline_bytes"]) if zb.get("roofline_bytes") else None
        out["decode_batch"] = {"context": ctx, "batch": b, "ratio": ratio, "roofline_ratio": roof,
                               "zebra_tokens_per_s": zb["tokens_per_s"], "llama_tokens_per_s": lb["tokens_per_s"],
                               "zebra_kernel": zb["kernel"], "llama_kernel": lb["kernel"]}
        check("decode_ratio_batch", ratio, TARGETS["decode_ratio_batch"], reportable=reportable)

    zm, lm = z.get("max_batch", {}), l.get("max_batch", {})
    if zm.get("batch") and lm.get("batch"):
        ratio = zm["batch"] / lm["batch"]
        out["max_batch"] = {"context": zm.get("context"), "zebra": zm["batch"], "llama": lm["batch"], "ratio": ratio,
                            "zebra_capped": zm.get("capped"), "llama_capped": lm.get("capped")}
        check("max_batch_ratio", ratio, TARGETS["max_batch_ratio"], reportable=reportable)
        zd = [r for r in zm.get("decode", []) if "tokens_per_s" in r]
        ld = [r for r in lm.get("decode", []) if "tokens_per_s" in r]
        if zd and ld:
            zbest, lbest = max(zd, key=lambda r: r["tokens_per_s"]), max(ld, key=lambda r: r["tokens_per_s"])
            ratio = zbest["tokens_per_s"] / lbest["tokens_per_s"]
            out["max_batch_decode"] = {"zebra_batch": zbest["batch"], "llama_batch": lbest["batch"],
                                       "zebra_tokens_per_s": zbest["tokens_per_s"],
                                       "llama_tokens_per_s": lbest["tokens_per_s"], "ratio": ratio,
                                       "zebra_kernel": zbest["kernel"], "llama_kernel": lbest["kernel"]}
            check("max_batch_decode_ratio", ratio, TARGETS["max_batch_decode_ratio"], reportable=reportable)

    prefill = {}
    zp = {r["context"]: r for r in z.get("prefill", []) if "tokens_per_s" in r}
    lp = {r["context"]: r for r in l.get("prefill", []) if "tokens_per_s" in r}
    for c in sorted(set(zp) & set(lp)):
        prefill[str(c)] = zp[c]["tokens_per_s"] / lp[c]["tokens_per_s"]
        if c in args.prefill_target_contexts:
            check(f"prefill_ratio_{c}", prefill[str(c)], TARGETS["prefill_ratio"], reportable=reportable)
    out["prefill_ratio"] = prefill
    decode_ratio = {}
    for c in args.contexts:
        zr, lr = best_decode(z.get("decode"), c, b), best_decode(l.get("decode"), c, b)
        if zr and lr:
            decode_ratio[str(c)] = zr["tokens_per_s"] / lr["tokens_per_s"]
    out["decode_ratio_batch"] = decode_ratio
    notes = []
    if gate is False:
        notes.append("the base is below 60% of its decode roofline: the ratios are not reportable until the "
                     "harness gets it there")
    failed = [m for m, ok in out["decode_checks_pass"].items() if not ok]
    if failed:
        notes.append(f"decode check failed for {failed} (graphed static-cache step vs the eager reference): the "
                     "ratios are not reportable")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def print_summary(s: dict):
    print("summary:", flush=True)
    for name, c in s.get("checks", {}).items():
        flag = "PASS" if c["pass"] else "FAIL"
        note = "" if c.get("reportable", True) else " (not reportable: see the note)"
        print(f"  {name:28s} {c['value']:.4g} (target {'<=' if name.endswith('rel_err') else '>='} "
              f"{c['target']}) {flag}{note}", flush=True)
    if s.get("note"):
        print("  " + s["note"], flush=True)


# ------------------------------------------------------------------------------------------------ meta
def versions() -> dict:
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__}
    for pkg in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            out[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            try:
                out[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                out[pkg] = None
    return out


def meta(args, device) -> dict:
    from zebra.model.ssd import select_backend

    cuda = torch.device(device).type == "cuda"
    info = {"versions": versions(), "device": device, "dtype": args.dtype,
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "mamba_backend": select_backend(device, getattr(torch, args.dtype)),
            "args": {k: v for k, v in vars(args).items() if k not in ("plot",)},
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if cuda:
        info["device_total_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / GIB
    return info


# ------------------------------------------------------------------------------------------------ plots
def plot(json_path: str | Path, plot_dir: str | Path) -> list[str]:
    """tokens/s vs context (prefill and decode at the benchmark batch, both models) and peak memory vs batch
    (the largest-batch search at the longest context). Needs matplotlib; returns the written paths."""
    try:
        from zebra.eval.plots import _plt, save_figure
        plt = _plt()
    except ImportError as e:
        print(f"matplotlib not available ({e}); skipping plots", flush=True)
        return []
    res = json.loads(Path(json_path).read_text())
    models = res.get("models", {})
    batch = res.get("meta", {}).get("args", {}).get("batch")
    colors = {"zebra": "tab:blue", "llama": "tab:orange"}
    labels = {"zebra": "Zebra hybrid (MLA + Mamba2)", "llama": "Llama base"}
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("prefill", "decode")):
        for name, m in models.items():
            recs = [r for r in m.get(kind) or [] if "tokens_per_s" in r and r.get("batch") == batch]
            if kind == "decode":
                recs = [best_decode(recs, c, batch) for c in sorted({r["context"] for r in recs})]
            recs = sorted(recs, key=lambda r: r["context"])
            if recs:
                ax.plot([r["context"] for r in recs], [r["tokens_per_s"] for r in recs], "o-",
                        color=colors.get(name), label=labels.get(name, name))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{kind}, batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    paths.append(save_figure(fig, Path(plot_dir) / "generation_tokens_per_s.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    total = res.get("meta", {}).get("device_total_memory_gib")
    for name, m in models.items():
        trials = sorted((m.get("max_batch") or {}).get("trials", []), key=lambda r: r["batch"])
        ok = [r for r in trials if r.get("fits") and r.get("peak_gib") is not None]
        bad = [r for r in trials if not r.get("fits")]
        if ok:
            ax.plot([r["batch"] for r in ok], [r["peak_gib"] for r in ok], "o-", color=colors.get(name),
                    label=f"{labels.get(name, name)} (max {m['max_batch'].get('batch')})")
        if bad:
            ax.plot([r["batch"] for r in bad], [total or r.get("peak_gib") or 0 for r in bad], "x",
                    color=colors.get(name), label=f"{labels.get(name, name)}: out of memory")
    if total:
        ax.axhline(total, color="gray", ls="--", lw=1, label="device memory")
    ctx = res.get("meta", {}).get("args", {}).get("max_batch_context")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("peak memory (GiB)")
    ax.set_title(f"decode memory vs batch at {ctx} tokens")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no memory figures (CPU run?)", ha="center", va="center", transform=ax.transAxes)
    paths.append(save_figure(fig, Path(plot_dir) / "generation_memory_vs_batch.png"))
    for p in paths:
        print(f"wrote {p}", flush=True)
    return paths


# ------------------------------------------------------------------------------------------------ CLI
def ints(s: str) -> list[int]:
    return [int(x) for x in str(s).split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/generation_bench.json")
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
    ap.add_argument("--plot-dir", default="experiments")
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
