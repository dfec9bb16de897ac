"""Layer benchmark: forward + backward time of one mixer layer, ours against its baseline.

    python -m benchmarks.layers                                              # GPU, zebra_1b dims, bf16
    python -m benchmarks.layers --device cpu --smoke --out /tmp/bench.json   # tiny shapes, checks it runs

(1) MLA (`zebra.model.mla.MultiHeadLatentAttention`) against a Llama GQA attention through SDPA with the
same base dims, both under the same mask: plain causal, and block-causal over packed documents.
(2) Our attention-shaped Mamba2Mixer against mamba_ssm's Mamba2 at equal heads / state / head dims
(theirs projects x and B at full width, ngroups = heads), both without the fused mem-eff path.

Times are medians over CUDA-event-timed iterations after a warm-up; numbers are only comparable within one
run on one card, which the JSON records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import traceback

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import GIB, Device
from zebra.model.configuration_zebra import ZebraConfig
from zebra.model.mamba2 import Mamba2Mixer
from zebra.model.mla import MultiHeadLatentAttention
from zebra.model.ops.dispatch import mamba_backend
from zebra.model.packing import block_causal_mask
from zebra.utils.files import write_json_atomic

ZEBRA_1B = dict(vocab_size=128256, max_position_embeddings=131072, hidden_size=2048, intermediate_size=8192,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, q_lora_rank=1344, kv_lora_rank=128,
                qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, mamba_chunk_size=256,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
SMOKE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
             mamba_chunk_size=16)


class GQAAttention(nn.Module):
    """The base's attention: q/k/v/o projections, RoPE, SDPA with GQA (the layer MLA replaces)."""

    def __init__(self, config: ZebraConfig):
        super().__init__()
        H, self.hd = config.hidden_size, config.head_dim
        self.h, self.g = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(H, self.h * self.hd, bias=False)
        self.k_proj = nn.Linear(H, self.g * self.hd, bias=False)
        self.v_proj = nn.Linear(H, self.g * self.hd, bias=False)
        self.o_proj = nn.Linear(self.h * self.hd, H, bias=False)
        theta = float(config.rope_parameters["rope_theta"])
        self.register_buffer("inv_freq", theta ** -(torch.arange(0, self.hd, 2).float() / self.hd), persistent=False)

    def rotate(self, x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def forward(self, x, position_ids, mask=None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.g, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.g, self.hd).transpose(1, 2)
        freqs = position_ids[:, None, :, None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.h * self.hd))


def time_fwd_bwd(fn, x, warmup: int, iters: int) -> dict:
    """Median ms of forward + backward of `fn(x)` (x and the module's parameters get gradients)."""
    dev = Device(x.device)
    grad_out = None

    def step():
        nonlocal grad_out
        x.grad = None
        out = fn(x)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)

    for _ in range(warmup):
        step()
    dev.reset_peak()
    times = [dev.time(step) * 1e3 for _ in range(iters)]
    res = {"ms": statistics.median(times), "ms_min": min(times), "iters": iters}
    if dev.cuda:
        res["peak_mem_gib"] = dev.peak() / GIB
    return res


def run_case(name: str, results: dict, build):
    """Build and time one case; an error is recorded (and printed) instead of ending the whole run."""
    try:
        results[name] = build()
        print(f"{name:28s} {results[name]['ms']:9.3f} ms")
    except Exception as e:  # e.g. mamba_ssm missing on CPU
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name:28s} ERROR {results[name]['error']}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ratio(results, a, b):
    ra, rb = results.get(a, {}), results.get(b, {})
    return ra["ms"] / rb["ms"] if "ms" in ra and "ms" in rb else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="experiments/layers/layers_bench.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (checks the script, times nothing useful)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--docs", type=int, default=4, help="documents per row in the packed cases")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dims = SMOKE if args.smoke else ZEBRA_1B
    batch, seq = (2, 64) if args.smoke else (args.batch, args.seq)
    warmup, iters = (1, 3) if args.smoke else (args.warmup, args.iters)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = ZebraConfig(num_hidden_layers=2, hybrid_layer_types=["mla", "mamba"], **dims)
    torch.manual_seed(0)

    def hidden():
        return torch.randn(batch, seq, cfg.hidden_size, device=device, dtype=dtype, requires_grad=True)

    positions = torch.arange(seq, device=device).expand(batch, seq)
    doc_len = seq // args.docs
    doc_ids = (torch.arange(seq, device=device) // doc_len).clamp(max=args.docs - 1).expand(batch, seq)
    doc_positions = positions - doc_ids * doc_len
    packed_mask = block_causal_mask(doc_ids)

    results = {}

    def mla(packed):
        m = MultiHeadLatentAttention(cfg, 0).to(device=device, dtype=dtype)
        if packed:
            return time_fwd_bwd(lambda x: m(x, position_ids=doc_positions, doc_ids=doc_ids), hidden(), warmup, iters)
        return time_fwd_bwd(lambda x: m(x, position_ids=positions), hidden(), warmup, iters)

    def gqa(packed):
        m = GQAAttention(cfg).to(device=device, dtype=dtype)
        if packed:
            return time_fwd_bwd(lambda x: m(x, doc_positions, packed_mask), hidden(), warmup, iters)
        return time_fwd_bwd(lambda x: m(x, positions), hidden(), warmup, iters)

    def ours(packed):
        m = Mamba2Mixer(cfg, 1).to(device=device, dtype=dtype)
        kw = {"doc_ids": doc_ids} if packed else {}
        res = time_fwd_bwd(lambda x: m(x, **kw), hidden(), warmup, iters)
        res["backend"] = mamba_backend(m.config, device, dtype)
        return res

    def theirs():
        from mamba_ssm.modules.mamba2 import Mamba2
        m = Mamba2(d_model=cfg.hidden_size, d_state=cfg.mamba_d_state, d_conv=cfg.mamba_d_conv, expand=1,
                   headdim=cfg.mamba_headdim, ngroups=cfg.mamba_nheads, chunk_size=cfg.mamba_chunk_size,
                   use_mem_eff_path=False, device=device, dtype=dtype)
        return time_fwd_bwd(lambda x: m(x), hidden(), warmup, iters)

    run_case("mla_causal", results, lambda: mla(False))
    run_case("gqa_causal", results, lambda: gqa(False))
    run_case("mla_packed", results, lambda: mla(True))
    run_case("gqa_packed", results, lambda: gqa(True))
    run_case("mamba2_ours", results, lambda: ours(False))
    run_case("mamba2_ours_packed", results, lambda: ours(True))
    run_case("mamba2_mamba_ssm", results, theirs)

    report = {
        "card": Device(device).name(),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "smoke": args.smoke,
        "shape": {"batch": batch, "seq": seq, "docs_per_row_packed": args.docs, **dims},
        "env_ZEBRA_MAMBA_KERNELS": os.environ.get("ZEBRA_MAMBA_KERNELS"),
        "results": results,
        "ratios": {
            "mla_over_gqa_causal": ratio(results, "mla_causal", "gqa_causal"),
            "mla_over_gqa_packed": ratio(results, "mla_packed", "gqa_packed"),
            "mamba2_ours_over_mamba_ssm": ratio(results, "mamba2_ours", "mamba2_mamba_ssm"),
        },
    }
    print(json.dumps(report["ratios"], indent=2))
    write_json_atomic(args.out, report)
    print(f"wrote {args.out} ({report['card']})")
    return report


if __name__ == "__main__":
    main()
