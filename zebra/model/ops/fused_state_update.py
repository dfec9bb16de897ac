"""The Mamba2 decode step's state update in one Triton kernel, reading grouped x and B as they come.

Per token and layer the eager decode computes A = -exp(A_log) (two kernels), copies x and B out to one row per
head (`repeat_interleave`, two kernels: the hybrid's x and B come in the attention's KV-head groups), then runs
mamba_ssm's `selective_state_update`. This kernel takes x [B, Gx, P], B [B, Gb, N], C [B, Gc, N] with head h
reading group h // (H / G) of each, A_log itself, and the raw step with dt_bias (softplus inside) or the final
step: one launch instead of five.

    state <- exp(dt * A) * state + dt * x (outer) B;   y = state . C + D * x       (state [B, H, P, N], in place)

Arithmetic in fp32 (fp64 for fp64 inputs). Runs on CUDA, and on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, how the tests check it against `zebra.model.ops.ssd.ssd_step`).
"""

from __future__ import annotations

import functools
import torch

from .triton_util import import_triton, interpreting, next_pow2, require_kernel_device

BLOCK_P = 16  # head-dim rows per program


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    triton, tl = import_triton()

    @triton.jit
    def state_update(state_ptr, x_ptr, dt_ptr, alog_ptr, b_ptr, c_ptr, d_ptr, dtb_ptr, y_ptr,
                     H, P, N, x_rep, b_rep, c_rep,
                     s_b, s_h, s_p, s_n, x_b, x_g, x_p, dt_b, dt_h, b_b, b_g, b_n, c_b, c_g, c_n, y_b, y_h, y_p,
                     HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, F64: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        bi = tl.program_id(0).to(tl.int64)  # 64-bit batch offsets: large batches pass 2**31 elements
        h = tl.program_id(1)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        p_ok = p < P
        n_ok = n < N
        cd = tl.float64 if F64 else tl.float32
        dt = tl.load(dt_ptr + bi * dt_b + h * dt_h).to(cd)
        if HAS_DT_BIAS:
            dt = dt + tl.load(dtb_ptr + h).to(cd)
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus, as torch's (threshold 20)
        a = -tl.exp(tl.load(alog_ptr + h).to(cd))
        decay = tl.exp(dt * a)
        x = tl.load(x_ptr + bi * x_b + (h // x_rep) * x_g + p * x_p, mask=p_ok, other=0.0).to(cd)
        bv = tl.load(b_ptr + bi * b_b + (h // b_rep) * b_g + n * b_n, mask=n_ok, other=0.0).to(cd)
        cv = tl.load(c_ptr + bi * c_b + (h // c_rep) * c_g + n * c_n, mask=n_ok, other=0.0).to(cd)
        tile = state_ptr + bi * s_b + h * s_h + p[:, None] * s_p + n[None, :] * s_n
        ok = p_ok[:, None] & n_ok[None, :]
        st = tl.load(tile, mask=ok, other=0.0).to(cd)
        st = decay * st + (dt * x)[:, None] * bv[None, :]
        tl.store(tile, st.to(state_ptr.dtype.element_ty), mask=ok)
        y = tl.sum(st * cv[None, :], axis=1)
        if HAS_D:
            y = y + tl.load(d_ptr + h).to(cd) * x
        tl.store(y_ptr + bi * y_b + h * y_h + p * y_p, y.to(y_ptr.dtype.element_ty), mask=p_ok)

    return state_update


def fused_state_update(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A_log: torch.Tensor,
                       B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None = None,
                       dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """state [B, H, P, N] (updated in place), x [B, Gx, P], dt [B, H] (raw with `dt_bias` [H], else final),
    A_log [H], B [B, Gb, N], C [B, Gc, N], D [H] -> y [B, H, P] in x's dtype."""
    require_kernel_device(state, "fused_state_update")
    b, h, p, n = state.shape
    gx, gb, gc = x.shape[1], B.shape[1], C.shape[1]
    if (x.shape != (b, gx, p) or B.shape != (b, gb, n) or C.shape != (b, gc, n) or dt.shape != (b, h)
            or h % gx or h % gb or h % gc):
        raise ValueError(f"fused_state_update: state {tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}: expected [B, H, P, N], [B, Gx, P], [B, H], "
                         "[B, Gb, N], [B, Gc, N] with each G dividing H")
    y = torch.empty(b, h, p, dtype=x.dtype, device=x.device)
    f64 = torch.float64 in (state.dtype, x.dtype)
    grid = (b, h, (p + BLOCK_P - 1) // BLOCK_P)
    _kernel(interpreting())[grid](
        state, x, dt, A_log, B, C, D if D is not None else A_log, dt_bias if dt_bias is not None else A_log, y,
        h, p, n, h // gx, h // gb, h // gc,
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *y.stride(),
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, F64=f64, BLOCK_P=BLOCK_P, BLOCK_N=next_pow2(n, lo=16))
    return y
