"""Split-key ("flash-decoding") attention for a few query rows against a long cache, in Triton.

Decode attention reads the whole cache once per step and does almost no arithmetic on it, so its speed is the
fraction of the memory bandwidth it reaches. The two-GEMM form (`decode_attention(kernel="matmul")`) reads the
keys in one batched GEMM with 4-32 rows, writes the scores, reads them back for the softmax and again for the
values GEMM; torch's SDPA with a mask gives each (batch, head) one thread block, too few for a long cache at small
batch. Here the keys of every (batch, KV head) are cut into `splits` ranges, one program per range: it streams
its keys and values once, keeps a running (online) softmax in registers, and writes one partial output per range;
the ranges are then combined with their softmax weights (one more small kernel).

MLA's absorbed attention has its values inside its keys (v = the first r_kv columns of the latent cache entries).
There a second kernel (`latent_attention`) loads each block of entries once, in power-of-two column pieces (zebra_8b:
128 + 32 value columns, 64 RoPE columns), and uses the same tiles for the scores and for the values (the general
kernel reads the keys in 64-column chunks and then the values again, padded to a power of two: 160 -> 256); it
works transposed, keys and value columns on the MMAs' long side (its docstring).

q [B, G, Q, D], k [B, G, S, D], v [B, G, S, Dv]: G key/value heads, each read by Q query rows (GQA query heads
folded into rows; MLA's absorbed attention has G = 1, Q = heads x tokens, D = r_kv + d_rope and v a prefix view of
k, whose second read comes from L2). mask: bool broadcastable to [B, G, Q, S], True = attend.

Runs on CUDA, and on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, how the tests check it).
"""

from __future__ import annotations

import functools
import math
import torch

from .triton_util import import_triton, interpreting, next_pow2, prev_pow2, require_kernel_device

BLOCK_D = 64  # key columns per scores MMA (D is looped over in chunks of this)
MAX_BLOCK_Q = 64  # query rows per program (more rows: more programs along the query axis)
MIN_SPLITS = 4  # key ranges per (batch, KV head) at least (split_count)
MIN_PIECE = 16  # the smallest column piece of the latent kernel (tl.dot's smallest inner size)


@functools.lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """The jitted kernel (built on first use, so that TRITON_INTERPRET set by a caller takes effect)."""
    triton, tl = import_triton()

    @triton.jit
    def split_attention(q_ptr, k_ptr, v_ptr, m_ptr, out_ptr, mx_ptr, l_ptr,
                        sqb, sqg, sqq, sqd, skb, skg, sks, skd, svb, svg, svs, svd, smb, smg, smq, sms,
                        sob, sog, sop, soq, sod, slb, slg, slp, slq,
                        G, NQ, S, D, DV, scale,
                        N_BLOCKS: tl.constexpr, HAS_MASK: tl.constexpr, D_CHUNKS: tl.constexpr, BLOCK_Q: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                        PRECISION: tl.constexpr):
        # int64: at a long context and a large batch, batch x batch-stride passes 2**31 elements (zebra_8b's
        # latent cache at 32k x 738 is 14e9), and a 32-bit offset wraps into another allocation
        bg = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        qb = tl.program_id(2)
        b = bg // G
        g = bg % G
        rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_ok = rows < NQ
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < DV
        q_base = q_ptr + b * sqb + g * sqg
        k_base = k_ptr + b * skb + g * skg
        v_base = v_ptr + b * svb + g * svg
        start = split * (N_BLOCKS * BLOCK_S)
        end = tl.minimum(start + N_BLOCKS * BLOCK_S, S)

        m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
        for i in range(0, N_BLOCKS):
            cols = start + i * BLOCK_S + offs_s
            col_ok = cols < end
            scores = tl.zeros([BLOCK_Q, BLOCK_S], tl.float32)
            for c in tl.static_range(D_CHUNKS):
                d = c * BLOCK_D + offs_d
                d_ok = d < D
                q = tl.load(q_base + rows[:, None] * sqq + d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :],
                            other=0.0)
                k = tl.load(k_base + cols[None, :] * sks + d[:, None] * skd, mask=d_ok[:, None] & col_ok[None, :],
                            other=0.0)  # [BLOCK_D, BLOCK_S]: keys as columns
                scores += tl.dot(q, k, input_precision=PRECISION)
            scores = scores * scale
            valid = row_ok[:, None] & col_ok[None, :]
            if HAS_MASK:
                keep = tl.load(m_ptr + b * smb + g * smg + rows[:, None] * smq + cols[None, :] * sms, mask=valid,
                               other=0)
                valid = valid & (keep != 0)
            scores = tl.where(valid, scores, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.where(valid, tl.exp(scores - m_new[:, None]), 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + cols[:, None] * svs + offs_dv[None, :] * svd, mask=col_ok[:, None] & dv_ok[None, :],
                        other=0.0)  # [BLOCK_S, BLOCK_DV]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        o_base = out_ptr + b * sob + g * sog + split * sop
        tl.store(o_base + rows[:, None] * soq + offs_dv[None, :] * sod, acc, mask=row_ok[:, None] & dv_ok[None, :])
        ml = b * slb + g * slg + split * slp + rows * slq
        tl.store(mx_ptr + ml, m_i, mask=row_ok)
        tl.store(l_ptr + ml, l_i, mask=row_ok)

    return split_attention


@functools.lru_cache(maxsize=2)
def _latent_kernel(interpret: bool):
    """The kernel for values that are the first DV columns of the keys (MLA's latent cache): each block of keys is
    loaded once as three column pieces, [0, DV_A) and [DV_A, DV) (the values) and [DV, D) (the rest of the key),
    each a power of two wide (the last two masked to their true width); the query's pieces are loaded once per
    program. Computed transposed, scores^T = K q^T [keys, rows] and out^T = V^T p^T [columns, rows], so that the
    MMAs' M side is the keys (64) and the value columns (128) rather than MLA's 32 query rows (Hopper's warpgroup
    MMA takes M >= 64): 59.2 against 72.8 us per call untransposed at zebra_8b's 32k x 8, 4.72 against 6.59 ms at
    32k x 739 (one H200; the untransposed kernel is in git, commit 9b8ee66). Same outputs as `split_attention`
    (partial outputs, maxima and sums per key range)."""
    triton, tl = import_triton()

    @triton.jit
    def latent_attention(q_ptr, e_ptr, m_ptr, out_ptr, mx_ptr, l_ptr,
                         sqb, sqg, sqq, sqd, seb, seg, ses, sed, smb, smg, smq, sms,
                         sob, sog, sop, soq, sod, slb, slg, slp, slq,
                         G, NQ, S, D, DV, scale,
                         N_BLOCKS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_ONE_ROW: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, DV_A: tl.constexpr, DV_B: tl.constexpr,
                         D_R: tl.constexpr, PRECISION: tl.constexpr):
        bg = tl.program_id(0).to(tl.int64)  # int64: see split_attention
        split = tl.program_id(1)
        qb = tl.program_id(2)
        b = bg // G
        g = bg % G
        rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_ok = rows < NQ
        offs_s = tl.arange(0, BLOCK_S)
        ca = tl.arange(0, DV_A)
        cb = DV_A + tl.arange(0, DV_B)
        cr = DV + tl.arange(0, D_R)
        cb_ok = cb < DV
        cr_ok = cr < D
        q_base = q_ptr + b * sqb + g * sqg + rows[None, :] * sqq  # the query pieces as columns: [piece, BLOCK_Q]
        qa = tl.load(q_base + ca[:, None] * sqd, mask=row_ok[None, :], other=0.0)
        qv = tl.load(q_base + cb[:, None] * sqd, mask=cb_ok[:, None] & row_ok[None, :], other=0.0)
        qr = tl.load(q_base + cr[:, None] * sqd, mask=cr_ok[:, None] & row_ok[None, :], other=0.0)
        e_base = e_ptr + b * seb + g * seg
        start = split * (N_BLOCKS * BLOCK_S)
        end = tl.minimum(start + N_BLOCKS * BLOCK_S, S)

        m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc_a = tl.zeros([DV_A, BLOCK_Q], tl.float32)
        acc_b = tl.zeros([DV_B, BLOCK_Q], tl.float32)
        for i in range(0, N_BLOCKS):
            cols = start + i * BLOCK_S + offs_s
            col_ok = cols < end
            rows_e = e_base + cols[:, None] * ses
            ka = tl.load(rows_e + ca[None, :] * sed, mask=col_ok[:, None], other=0.0)
            kb = tl.load(rows_e + cb[None, :] * sed, mask=col_ok[:, None] & cb_ok[None, :], other=0.0)
            kr = tl.load(rows_e + cr[None, :] * sed, mask=col_ok[:, None] & cr_ok[None, :], other=0.0)
            scores = tl.dot(ka, qa, input_precision=PRECISION)  # [BLOCK_S, BLOCK_Q]
            scores = tl.dot(kb, qv, scores, input_precision=PRECISION)
            scores = tl.dot(kr, qr, scores, input_precision=PRECISION) * scale
            if HAS_MASK:
                if MASK_ONE_ROW:
                    keep = tl.load(m_ptr + b * smb + g * smg + cols * sms, mask=col_ok, other=0)
                    valid = (col_ok & (keep != 0))[:, None] & row_ok[None, :]
                else:
                    valid = col_ok[:, None] & row_ok[None, :]
                    keep = tl.load(m_ptr + b * smb + g * smg + rows[None, :] * smq + cols[:, None] * sms,
                                   mask=valid, other=0)
                    valid = valid & (keep != 0)
            else:
                valid = col_ok[:, None] & row_ok[None, :]
            scores = tl.where(valid, scores, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(scores, 0))
            p = tl.where(valid, tl.exp(scores - m_new[None, :]), 0.0)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 0)
            p = p.to(ka.dtype)
            acc_a = tl.dot(tl.trans(ka), p, acc_a * alpha[None, :], input_precision=PRECISION)
            acc_b = tl.dot(tl.trans(kb), p, acc_b * alpha[None, :], input_precision=PRECISION)
            m_i = m_new

        o_base = out_ptr + b * sob + g * sog + split * sop + rows[None, :] * soq
        tl.store(o_base + ca[:, None] * sod, acc_a, mask=row_ok[None, :])
        tl.store(o_base + cb[:, None] * sod, acc_b, mask=cb_ok[:, None] & row_ok[None, :])
        ml = b * slb + g * slg + split * slp + rows * slq
        tl.store(mx_ptr + ml, m_i, mask=row_ok)
        tl.store(l_ptr + ml, l_i, mask=row_ok)

    return latent_attention


def latent_pieces(d: int, dv: int) -> tuple[int, int, int] | None:
    """(DV_A, DV_B, D_R): the latent kernel's column pieces for keys of d columns whose first dv are the values,
    each a power of two of at least MIN_PIECE (zebra_8b: 160 + 64 -> 128, 32, 64); None where the pieces would pad
    the entries by more than half (then the general kernel is as good)."""
    if dv < 2 * MIN_PIECE or d <= dv:
        return None
    a = prev_pow2(dv - 1)  # a power-of-two dv is cut in two halves, so that both value pieces are real
    b, r = next_pow2(dv - a, lo=MIN_PIECE), next_pow2(d - dv, lo=MIN_PIECE)
    if a + b + r > 1.5 * d:
        return None
    return a, b, r


@functools.lru_cache(maxsize=2)
def _combine_kernel(interpret: bool):
    """The ranges' partial outputs weighted by their softmax maxima and sums, in one pass: one program per
    (batch x KV head, query row, block of value columns)."""
    triton, tl = import_triton()

    @triton.jit
    def combine(out_ptr, mx_ptr, l_ptr, res_ptr, sob, sog, sop, soq, sod, slb, slg, slp, slq, srb, srg, srq, srd,
                G, P, DV, BLOCK_P: tl.constexpr, BLOCK_DV: tl.constexpr):
        bg = tl.program_id(0).to(tl.int64)
        row = tl.program_id(1)
        cols = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
        b = bg // G
        g = bg % G
        p = tl.arange(0, BLOCK_P)
        p_ok = p < P
        col_ok = cols < DV
        ml = b * slb + g * slg + p * slp + row * slq
        m = tl.load(mx_ptr + ml, mask=p_ok, other=-1.0e30)
        w = tl.where(p_ok, tl.exp(m - tl.max(m, 0)), 0.0)  # 0 for ranges that saw no key (their sum is 0 too)
        den = tl.sum(tl.load(l_ptr + ml, mask=p_ok, other=0.0) * w, 0)
        o = tl.load(out_ptr + b * sob + g * sog + p[:, None] * sop + row * soq + cols[None, :] * sod,
                    mask=p_ok[:, None] & col_ok[None, :], other=0.0)
        num = tl.sum(o * w[:, None], 0)
        tl.store(res_ptr + b * srb + g * srg + row * srq + cols * srd, (num / den).to(res_ptr.dtype.element_ty),
                 mask=col_ok)

    return combine


def _target_programs(device: torch.device, per_sm: int = 4) -> int:
    if device.type == "cuda":
        return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return 2 * per_sm


def split_count(batch_heads: int, q_blocks: int, keys: int, block_s: int, device: torch.device,
                splits: int | None = None, per_sm: int = 4) -> int:
    """Key ranges per (batch, KV head): enough programs for `per_sm` per SM (the general kernel 4, the latent one 2)
    and at least MIN_SPLITS (at a large batch one range per row left each program a long serial loop: at zebra_8b's
    32k x 739 on an H200, 4 ranges 7.3 ms, 2 ranges 9.1 ms, one requested (512 + 1 key blocks) 12.3 ms), none
    empty."""
    most = max(1, math.ceil(keys / block_s))
    if splits is None:
        splits = max(MIN_SPLITS, math.ceil(_target_programs(device, per_sm) / max(1, batch_heads * q_blocks)))
    return max(1, min(int(splits), most))


def combine_ranges_torch(out: torch.Tensor, mx: torch.Tensor, lsum: torch.Tensor, dtype) -> torch.Tensor:
    """The key ranges' partial outputs out [B, G, P, Q, Dv] (fp32) combined with their maxima and softmax sums
    [B, G, P, Q] in torch ops -> [B, G, Q, Dv] in `dtype` (the reference of the combine kernel)."""
    top = mx.amax(dim=2, keepdim=True)
    w = torch.exp(mx - top)  # 0 for ranges that saw no key
    num = (out * w[..., None]).sum(2)
    den = (lsum * w).sum(2)[..., None]
    return (num / den).to(dtype)


def values_in_keys(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether v is a view of k's first columns (MLA's absorbed attention: v = entries[..., :r_kv])."""
    return (v.data_ptr() == k.data_ptr() and v.stride() == k.stride() and v.shape[:3] == k.shape[:3]
            and v.shape[3] <= k.shape[3])


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 splits: int | None = None, *, block_s: int | None = None, num_warps: int | None = None,
                 num_stages: int | None = None, torch_combine: bool = False,
                 latent: bool | None = None) -> torch.Tensor:
    """softmax(scale * q k^T, masked) v -> [B, G, Q, Dv] in q's dtype (see the module docstring). `block_s`,
    `num_warps`, `num_stages` override the launch configuration, `torch_combine` combines the key ranges with torch
    ops instead of the kernel, `latent` False keeps the general kernel where v is a prefix view of k (True requires
    the latent one) (measurements: experiments/decode_attention)."""
    require_kernel_device(q, "flash_decode")
    b, g, nq, d = q.shape
    s, dv = k.shape[2], v.shape[3]
    if k.shape[:2] != (b, g) or v.shape[:3] != (b, g, s) or k.shape[3] != d:
        raise ValueError(f"flash_decode: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not "
                         "match [B, G, Q, D], [B, G, S, D], [B, G, S, Dv]")
    pieces = latent_pieces(d, dv) if latent is not False and values_in_keys(k, v) else None
    if latent and pieces is None:
        raise ValueError(f"flash_decode: latent=True needs v to be a view of k's first columns, with at least "
                         f"{2 * MIN_PIECE} of them and some key columns beyond (d {d}, dv {dv})")
    block_q = min(MAX_BLOCK_Q, next_pow2(nq, lo=16))
    per_sm = 4
    if pieces is not None:
        # 64 keys per block, 4 warps, 3 stages, about two programs per SM: at zebra_8b's 32k x 8 (each call
        # graph-timed, one H200) 59.2 us per call against 79.7 us for the general kernel, at 32k x 739 4.72 against
        # 7.09 ms (experiments/decode_attention, "latent-t" in its latent sweep; the untransposed form's grid, where
        # 2 stages and four programs per SM took 88.6 us: decode_latent_sweep_rows_h200.jsonl). 8 warps or 128 keys
        # per block were slower in both forms.
        block_s, num_stages, per_sm = block_s or 64, num_stages or 3, 2
    else:
        # 64 keys per block, 4 warps, 2 stages: at MLA's shape (32 rows x 160 value columns, the widest tile here)
        # at 32k x 739 this ran in 7.3 ms against 25.8 ms for the earlier 32 keys / 8 warps, and 12.1 ms for the
        # matmul path (H200, experiments/decode_attention/decode_large_batch_h200.json)
        block_s = block_s or 64
        wide = block_q * next_pow2(dv, lo=16) > 32 * 128
        num_stages = num_stages or (2 if wide else None)
    q_blocks = math.ceil(nq / block_q)
    n_split = split_count(b * g, q_blocks, s, block_s, q.device, splits, per_sm)
    # key blocks per range, a power of two: a compile-time loop count (Triton's interpreter takes no runtime loop
    # bound), so a growing cache recompiles the kernel only when the count doubles. Rounded down (and the ranges
    # made more): rounded up, a range count of one at a large batch looped over up to twice the keys there are.
    n_blocks = prev_pow2(math.ceil(math.ceil(s / n_split) / block_s))
    n_split = math.ceil(s / (n_blocks * block_s))

    out = torch.empty(b, g, n_split, nq, dv, device=q.device, dtype=torch.float32)
    mx = torch.empty(b, g, n_split, nq, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(mx)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"flash_decode: mask must be bool (True = attend), got {mask.dtype}")
        # bytes for the kernel: a view where possible; inductor cannot lower a bool -> uint8 view (a conversion
        # under torch.compile copies the mask, at decode one row of S bytes)
        m = (mask.to(torch.uint8) if torch.compiler.is_compiling() else mask.view(torch.uint8)).expand(b, g, nq, s)
        m_strides = m.stride()
    else:
        m, m_strides = q, (0, 0, 0, 0)  # unused pointer
    grid = (b * g, n_split, q_blocks)
    common = dict(N_BLOCKS=n_blocks, HAS_MASK=mask is not None, BLOCK_Q=block_q, BLOCK_S=block_s,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps or 4,
                  **({"num_stages": num_stages} if num_stages else {}))
    if pieces is not None:
        dv_a, dv_b, d_r = pieces
        _latent_kernel(interpreting())[grid](
            q, k, m, out, mx, lsum, *q.stride(), *k.stride(), *m_strides, *out.stride(), *mx.stride(), g, nq, s, d,
            dv, float(scale), MASK_ONE_ROW=m_strides[2] == 0, DV_A=dv_a, DV_B=dv_b, D_R=d_r, **common)
    else:
        _kernel(interpreting())[grid](
            q, k, v, m, out, mx, lsum, *q.stride(), *k.stride(), *v.stride(), *m_strides, *out.stride(),
            *mx.stride(), g, nq, s, d, dv, float(scale), D_CHUNKS=math.ceil(d / BLOCK_D), BLOCK_D=BLOCK_D,
            BLOCK_DV=next_pow2(dv, lo=16), **common)
    if torch_combine:
        return combine_ranges_torch(out, mx, lsum, q.dtype)
    # combine the ranges in one kernel instead of combine_ranges_torch's six ops and its [B, G, splits, Q, Dv]
    # temporary (the hybrid's decode at batch 8 and 32k has 129 ranges per row); before/after:
    # experiments/decode_attention
    res = torch.empty(b, g, nq, dv, device=q.device, dtype=q.dtype)
    block_p = next_pow2(n_split)
    block_c = max(16, min(next_pow2(dv), 8192 // block_p))  # the [ranges, columns] tile within 8k fp32 values
    _combine_kernel(interpreting())[(b * g, nq, math.ceil(dv / block_c))](
        out, mx, lsum, res, *out.stride(), *mx.stride(), *res.stride(), g, n_split, dv, BLOCK_P=block_p,
        BLOCK_DV=block_c, num_warps=4)
    return res
