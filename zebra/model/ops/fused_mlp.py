"""The MLP's gate, `silu(gate) * up`, as one Triton kernel for inference on GPUs.

Eager it is two elementwise kernels (SiLU, then the product) between the up/gate and down GEMMs; at decode each
moves a few hundred kilobytes and costs its launch: 2 x 32 of them per token in zebra_8b. Here one kernel reads
gate and up and writes the product, with the eager numerics: SiLU in fp32 rounded to the inputs' dtype, then the
product in fp32 rounded again (as `F.silu` and `*` do for 16-bit tensors).

Inference only (no autograd); `ZebraMLP` takes it for CUDA tensors when gradients are off and
`config.fused_kernels` is on (ops/dispatch.py). Runs on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, the tests).
"""

from __future__ import annotations

import functools

import torch

from .triton_util import import_triton, interpreting, require_kernel_device

BLOCK = 1024  # elements per program


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    triton, tl = import_triton()

    @triton.jit
    def silu_mul(gate_ptr, up_ptr, out_ptr, N, F64: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        cd = tl.float64 if F64 else tl.float32
        g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(cd)
        u = tl.load(up_ptr + offs, mask=ok, other=0.0)
        act = (g / (1.0 + tl.exp(-g))).to(u.dtype)  # F.silu's result, in the inputs' dtype
        tl.store(out_ptr + offs, (act.to(cd) * u.to(cd)).to(out_ptr.dtype.element_ty), mask=ok)

    return silu_mul


def fused_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` for two tensors of one shape and dtype."""
    require_kernel_device(gate, "fused_silu_mul")
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"fused_silu_mul: gate {tuple(gate.shape)} {gate.dtype}, up {tuple(up.shape)} {up.dtype}")
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    _kernel(interpreting())[(-(-n // BLOCK),)](g, u, out, n, F64=g.dtype == torch.float64, BLOCK=BLOCK, num_warps=4)
    return out

