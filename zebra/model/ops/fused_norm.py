"""RMSNorm, and residual add + RMSNorm, as one Triton kernel each, for inference on GPUs.

Eager, `weight * rms_norm(x)` is two kernels and the residual add before it a third; at decode (a few rows of a
few thousand values) each costs its launch, not its bytes: 32 layers x (2 norms x 2 + 1 add) of them per token.
Here one kernel reads the row (and the residual), writes the sum and the normed row, with the eager path's
numerics: sum rounded to its dtype, rms in fp32, the normed row rounded to x's dtype before the weight multiply
(as `F.rms_norm` then `weight *` do; Llama's RMSNorm).

Inference only (no autograd); `ZebraRMSNorm` takes it for CUDA tensors when gradients are off and
`config.fused_kernels` is on (ops/dispatch.py). Runs on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, the tests).
"""

from __future__ import annotations

import functools
import torch

from .triton_util import import_triton, interpreting, next_pow2, require_kernel_device


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    triton, tl = import_triton()

    @triton.jit
    def add_rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, H, eps,
                     HAS_RES: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # 64-bit row offsets: rows x H can pass 2**31 elements
        cols = tl.arange(0, BLOCK)
        ok = cols < H
        h = tl.load(x_ptr + row * H + cols, mask=ok, other=0.0)
        cd = tl.float64 if F64 else tl.float32  # torch's arithmetic type: fp32 for 16-bit and fp32 inputs
        if HAS_RES:
            r = tl.load(res_ptr + row * H + cols, mask=ok, other=0.0)
            h = (r.to(cd) + h.to(cd)).to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * H + cols, h, mask=ok)
        hf = h.to(cd)
        inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / H + eps)
        normed = (hf * inv).to(sum_ptr.dtype.element_ty)  # F.rms_norm returns its input's dtype
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * H + cols, (normed.to(cd) * w.to(cd)).to(out_ptr.dtype.element_ty), mask=ok)

    return add_rms_norm


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None):
    """`weight * rms_norm(x)`; with `residual`, (`weight * rms_norm(residual + x)`, `residual + x`)."""
    require_kernel_device(x, "fused_rms_norm")
    h = x.shape[-1]
    if weight.shape != (h,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"fused_rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}, residual "
                         f"{None if residual is None else tuple(residual.shape)}")
    x2 = x.reshape(-1, h).contiguous()
    res2 = residual.reshape(-1, h).contiguous() if residual is not None else x2
    sum_dtype = torch.promote_types(residual.dtype, x.dtype) if residual is not None else x.dtype
    # without a residual the kernel reads its dtypes from x (passed as the sum) and writes no sum
    summed = torch.empty(x2.shape, dtype=sum_dtype, device=x.device) if residual is not None else x2
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, sum_dtype), device=x.device)
    block = next_pow2(h, lo=16)
    _kernel(interpreting())[(x2.shape[0],)](x2, res2, weight, out, summed, h, float(eps),
                                            HAS_RES=residual is not None, F64=out.dtype == torch.float64,
                                            BLOCK=block,
                                            num_warps=8 if block >= 4096 else 4)
    out = out.view(x.shape)
    return (out, summed.view(x.shape)) if residual is not None else out
