"""The Mamba2 conv's decode step as one Triton kernel (for GPUs without causal-conv1d).

One decode token through the depthwise causal conv is: shift the per-channel window of the last inputs by one,
append the new input, take the dot product with the channel's taps, add the bias, SiLU. In PyTorch that is eight
kernels per Mamba2 layer (cat, casts, multiply, sum, bias, SiLU, the copy back into the cache), each moving a few
kilobytes: at decode their launches, not their bytes, are the cost, 24 layers x 8 of them per token for zebra_8b.
This kernel does it in one pass, updating the window in place.

Runs on CUDA, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, how the tests check it).
"""

from __future__ import annotations

import functools
import torch

from .triton_util import import_triton, interpreting, require_kernel_device

BLOCK_D = 256  # channels per program


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    triton, tl = import_triton()

    @triton.jit
    def conv_step(x_ptr, state_ptr, w_ptr, b_ptr, out_ptr, D,
                  sxb, sxd, ssb, ssd, ssw, swd, sww, sob, sod,
                  WS: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                  BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)  # 64-bit batch offsets: large batches pass 2**31 elements
        d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = d < D
        x = tl.load(x_ptr + b * sxb + d * sxd, mask=ok, other=0.0)
        s_base = state_ptr + b * ssb + d * ssd
        acc = tl.zeros([BLOCK], tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + d, mask=ok, other=0.0).to(tl.float32)
        # new window j = old window j + 1 (j < WS - 1), the new input at WS - 1; the taps see the last W of it
        for j in tl.static_range(WS):
            if j < WS - 1:
                val = tl.load(s_base + (j + 1) * ssw, mask=ok, other=0.0)
            else:
                val = x.to(state_ptr.dtype.element_ty)
            tl.store(s_base + j * ssw, val, mask=ok)
            if j >= WS - W:
                tap = tl.load(w_ptr + d * swd + (j - (WS - W)) * sww, mask=ok, other=0.0)
                acc += val.to(tl.float32) * tap.to(tl.float32)
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))  # SiLU (tl.sigmoid is a jit helper the interpreter may not take)
        tl.store(out_ptr + b * sob + d * sod, acc.to(out_ptr.dtype.element_ty), mask=ok)

    return conv_step


def fused_conv_update(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None, activation: bool = True) -> torch.Tensor:
    """As `zebra.model.ops.ssd.conv_update` with the torch step: x [B, D], conv_state [B, D, WS] (updated in place),
    weight [D, W] with W <= WS, bias [D] -> [B, D] in x's dtype (arithmetic in fp32)."""
    require_kernel_device(x, "fused_conv_update")
    b, d = x.shape
    ws, w = conv_state.shape[-1], weight.shape[-1]
    if conv_state.shape[:2] != (b, d) or weight.shape[0] != d or w > ws:
        raise ValueError(f"fused_conv_update: x {tuple(x.shape)}, conv_state {tuple(conv_state.shape)}, weight "
                         f"{tuple(weight.shape)} do not match [B, D], [B, D, WS], [D, W <= WS]")
    out = torch.empty_like(x)
    grid = (b, (d + BLOCK_D - 1) // BLOCK_D)
    _kernel(interpreting())[grid](
        x, conv_state, weight, bias if bias is not None else weight, out, d,
        *x.stride(), *conv_state.stride(), *weight.stride(), *out.stride(),
        WS=ws, W=w, HAS_BIAS=bias is not None, SILU=bool(activation), BLOCK=BLOCK_D)
    return out
