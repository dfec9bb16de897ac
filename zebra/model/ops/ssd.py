"""Mamba2's SSD scan and depthwise causal conv in plain PyTorch, and the calls that run them on mamba_ssm's kernels.

The recurrence, per head h (state S [P, N]):

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T          y_t = S_t C_t + D_h * x_t

Shapes follow mamba_ssm: x [B, L, H, P], dt [B, L, H], A [H], B/C [B, L, G, N] (head h reads group
h // (H / G)), D [H], state [B, H, P, N].

`dt` is the final step size: softplus(dt_raw + dt_bias) already applied by the caller, and zero at pads.
A zero step neither decays nor writes the state, which is how pads stay inert in every backend (the
kernels' own softplus could not give that zero). `A` is negative (-exp(A_log)).

`seq_idx` [B, L] (any integer labels): the state is reset wherever the label changes between neighbours,
so nothing flows across a document boundary, also inside a chunk. An `initial_state` (or conv state)
belongs to the first token's document.

The torch functions compute in at least fp32 (float64 stays float64) and return y in x's dtype and the
state in that compute dtype. `ssd_sequential_reference` is the definition, token by token, kept next to
the fast path (as mamba_ssm keeps `ssd_minimal`); `ssd_chunked_scan` is the O(L) chunked algorithm used
on CPU and as the reference for the CUDA kernels; `ssd_step` is one decode token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import causal_conv1d_kernels, mamba_ssm_kernels
from .fused_conv_step import fused_conv_update


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def _to_heads(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H / G) (GQA's repeat_kv order)."""
    g = t.shape[-2]
    return t if g == nheads else t.repeat_interleave(nheads // g, dim=-2)


def monotone_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """Relabel documents 0, 1, 2, ... per row, counting label changes: the kernels compare labels only
    between neighbours and assume they never repeat, and they give the initial state to label 0."""
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return F.pad(change.cumsum(-1, dtype=torch.int32), (1, 0))


# ---------------------------------------------------------------------------------------------------
# The definition, one token at a time (tests only).
# ---------------------------------------------------------------------------------------------------

def ssd_sequential_reference(x, dt, A, B, C, D=None, initial_state=None, seq_idx=None):
    """The recurrence straight from its definition. Returns (y [B, L, H, P], final_state [B, H, P, N])."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    cd = _compute_dtype(x.dtype, dt.dtype, B.dtype)
    xs, dts, As = x.to(cd), dt.to(cd), A.to(cd)
    Bs, Cs = _to_heads(B.to(cd), h), _to_heads(C.to(cd), h)
    state = x.new_zeros(b, h, p, n, dtype=cd) if initial_state is None else initial_state.to(cd)
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            new_doc = seq_idx[:, t] != seq_idx[:, t - 1]
            state = torch.where(new_doc[:, None, None, None], torch.zeros_like(state), state)
        decay = torch.exp(dts[:, t] * As)  # [b, h]
        write = dts[:, t, :, None, None] * xs[:, t, :, :, None] * Bs[:, t, :, None, :]
        state = decay[:, :, None, None] * state + write
        y = torch.einsum("bhpn,bhn->bhp", state, Cs[:, t])
        if D is not None:
            y = y + D.to(cd)[:, None] * xs[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1).to(x.dtype), state


# ---------------------------------------------------------------------------------------------------
# The chunked SSD algorithm (CPU path, and the reference the CUDA kernels are tested against).
# ---------------------------------------------------------------------------------------------------

def _segsum(a: torch.Tensor) -> torch.Tensor:
    """a [..., T] -> [..., T, T] with out[i, j] = a_{j+1} + ... + a_i for j <= i and -inf above the diagonal.

    Summing masked copies (rather than subtracting two cumsums) keeps every entry exact to rounding of its
    own terms; the difference of two long cumsums loses digits in fp32.
    """
    T = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, T)  # rows[..., k, j] = a_k
    strictly_below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    out = rows.masked_fill(~strictly_below, 0).cumsum(dim=-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return out.masked_fill(~causal, float("-inf"))


def ssd_chunked_scan(x, dt, A, B, C, D=None, initial_state=None, seq_idx=None, chunk_size=256):
    """The SSD scan in chunks: quadratic (attention-like) inside a chunk, a recurrence on states across
    chunks. O(L * chunk_size) time and memory. Returns (y [B, L, H, P], final_state [B, H, P, N])."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    Q = chunk_size
    cd = _compute_dtype(x.dtype, dt.dtype, B.dtype)
    xs, dts, As = x.to(cd), dt.to(cd), A.to(cd)
    Bs, Cs = _to_heads(B.to(cd), h), _to_heads(C.to(cd), h)
    seq = None if seq_idx is None else monotone_seq_idx(seq_idx)

    # Pad to whole chunks with zero steps (no decay, no write) that continue the last document.
    pad = (-L) % Q
    if pad:
        xs = F.pad(xs, (0, 0, 0, 0, 0, pad))
        dts = F.pad(dts, (0, 0, 0, pad))
        Bs, Cs = F.pad(Bs, (0, 0, 0, 0, 0, pad)), F.pad(Cs, (0, 0, 0, 0, 0, pad))
        if seq is not None:
            seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1)
    nc = (L + pad) // Q
    xs = xs.view(b, nc, Q, h, p)
    Bs, Cs = Bs.view(b, nc, Q, h, n), Cs.view(b, nc, Q, h, n)
    dts = dts.view(b, nc, Q, h)
    xdt = xs * dts[..., None]
    dA = (dts * As).permute(0, 3, 1, 2)  # [b, h, c, l]
    dA_cs = dA.cumsum(dim=-1)
    if seq is not None:
        seq = seq.view(b, nc, Q)
        # A carried state belongs to the document of the token it was last written by:
        # the first token's document before chunk 0, then each chunk's last token's.
        docs = torch.cat([seq[:, :1, 0], seq[:, :, -1]], dim=1)  # [b, c + 1]

    # 1. Inside each chunk: y_l = sum_{s <= l} (C_l . B_s) exp(dA_{s+1} + ... + dA_l) dt_s x_s.
    decay = torch.exp(_segsum(dA))  # [b, h, c, l, s]
    if seq is not None:
        decay = decay * (seq[:, :, :, None] == seq[:, :, None, :])[:, None]
    scores = torch.einsum("bclhn,bcshn->bhcls", Cs, Bs) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)

    # 2. What each chunk writes into the state at its end (only its last document's tokens count).
    to_end = torch.exp(dA_cs[..., -1:] - dA_cs)  # [b, h, c, l]
    if seq is not None:
        to_end = to_end * (seq == seq[:, :, -1:])[:, None]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bs, to_end, xdt)

    # 3. Pass states across chunks: entry z is the state before chunk z (entry nc: the final state).
    init = xs.new_zeros(b, h, p, n) if initial_state is None else initial_state.to(cd)
    sources = torch.cat([init[:, None], chunk_states], dim=1)  # [b, c + 1, h, p, n]
    passing = torch.exp(_segsum(F.pad(dA_cs[..., -1], (1, 0))))  # [b, h, c + 1, c + 1]
    if seq is not None:
        passing = passing * (docs[:, :, None] == docs[:, None, :])[:, None]
    states = torch.einsum("bhzs,bshpn->bzhpn", passing, sources)
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. The carried state's part of each output, for tokens still in the carried state's document.
    from_start = torch.exp(dA_cs)  # [b, h, c, l]
    if seq is not None:
        from_start = from_start * (seq == docs[:, :-1, None])[:, None]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cs, start_states, from_start)

    y = y.reshape(b, nc * Q, h, p)[:, :L]
    if D is not None:
        y = y + D.to(cd)[:, None] * x.to(cd)
    return y.to(x.dtype), final_state


def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None):
    """One decode token: state [B, H, P, N], x [B, H, P], dt [B, H], B/C [B, G, N].
    With `dt_bias` [H], `dt` is the raw step and softplus(dt + dt_bias) is taken here (as the kernel can).
    Returns (y [B, H, P] in x's dtype, new_state in state's dtype); `state` is not modified."""
    h = x.shape[1]
    cd = _compute_dtype(state.dtype, x.dtype, dt.dtype)
    if dt_bias is not None:
        cd = _compute_dtype(cd, dt_bias.dtype)
        dt = F.softplus(dt.to(cd) + dt_bias.to(cd))
    Bs, Cs = _to_heads(B.to(cd), h), _to_heads(C.to(cd), h)
    decay = torch.exp(dt.to(cd) * A.to(cd))  # [b, h]
    new = decay[..., None, None] * state.to(cd) + dt.to(cd)[..., None, None] * x.to(cd)[..., None] * Bs[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new, Cs)
    if D is not None:
        y = y + D.to(cd)[:, None] * x.to(cd)
    return y.to(x.dtype), new.to(state.dtype)


# ---------------------------------------------------------------------------------------------------
# Depthwise causal conv over [x, B, C] that never reaches into a previous document.
# ---------------------------------------------------------------------------------------------------

def causal_conv1d_torch(xBC, weight, bias=None, seq_idx=None, conv_state=None, activation=True):
    """xBC [B, L, D] (time-major, as in_proj gives it) -> [B, L, D] in xBC's dtype.

    weight [D, W] (nn.Conv1d's [D, 1, W] squeezed), bias [D]. Output t = bias + sum_k weight[:, W-1-k] *
    input[t-k], with taps that reach before the sequence reading `conv_state` [B, D, >= W-1] (the inputs
    before xBC, oldest first) or zero, and taps that reach into an earlier document (by `seq_idx`) zeroed:
    mamba_ssm's PyTorch fallback leaks the last W-1 tokens of the previous document; this must not.
    """
    b, L, d = xBC.shape
    W = weight.shape[-1]
    w = weight.to(xBC.dtype)
    bias = None if bias is None else bias.to(xBC.dtype)
    if conv_state is not None and W > 1:
        past = conv_state[..., conv_state.shape[-1] - (W - 1):].transpose(1, 2).to(xBC.dtype)
    else:
        past = None
    if seq_idx is None:
        # Nothing to mask: one library depthwise conv (it accumulates low-precision inputs in fp32).
        if past is None:
            out = F.conv1d(xBC.transpose(1, 2), w[:, None], bias, padding=W - 1, groups=d)[..., :L]
        else:
            out = F.conv1d(torch.cat([past, xBC], dim=1).transpose(1, 2), w[:, None], bias, groups=d)
        out = out.transpose(1, 2)
        return F.silu(out) if activation else out

    # With documents, tap by tap (a loop over the W taps, not over tokens), accumulating in fp32.
    if past is None:
        past = xBC.new_zeros(b, W - 1, d)
    padded = torch.cat([past, xBC], dim=1)  # [b, W - 1 + L, d]
    w32 = weight.to(_compute_dtype(weight.dtype, xBC.dtype))
    out = padded[:, W - 1:] * w32[:, W - 1]
    if bias is not None:
        out = out + bias
    # The conv state belongs to the first token's document, like an initial SSM state.
    seq_padded = torch.cat([seq_idx[:, :1].expand(b, W - 1), seq_idx], dim=1)
    for k in range(1, W):
        same_doc = (seq_padded[:, W - 1 - k: W - 1 - k + L] == seq_idx)[..., None]
        out = out + padded[:, W - 1 - k: W - 1 - k + L] * w32[:, W - 1 - k] * same_doc
    if activation:
        out = F.silu(out)
    return out.to(xBC.dtype)


def conv_step(x, conv_state, weight, bias=None, activation=True):
    """One decode token: x [B, D], conv_state [B, D, W] (last W inputs, oldest first).
    Returns (out [B, D] in x's dtype, new_conv_state); `conv_state` is not modified."""
    W = weight.shape[-1]
    new_state = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    cd = _compute_dtype(x.dtype, weight.dtype)
    out = (new_state[..., -W:].to(cd) * weight.to(cd)).sum(-1)
    if bias is not None:
        out = out + bias.to(cd)
    if activation:
        out = F.silu(out)
    return out.to(x.dtype), new_state


# ---------------------------------------------------------------------------------------------------
# The backends: mamba_ssm's (and causal-conv1d's) kernels for backend "mamba_ssm", the code above for "torch"
# (dispatch.mamba_backend picks one from the config).
# ---------------------------------------------------------------------------------------------------

def chunk_scan(x, dt, A, B, C, D, chunk_size, initial_state=None, seq_idx=None, backend="torch"):
    """Train / prefill scan. Returns (y [B, L, H, P] in x's dtype, final_state [B, H, P, N])."""
    if backend == "torch":
        return ssd_chunked_scan(x, dt, A, B, C, D, initial_state=initial_state, seq_idx=seq_idx,
                                chunk_size=chunk_size)
    k = mamba_ssm_kernels()
    seq = None if seq_idx is None else monotone_seq_idx(seq_idx).contiguous()
    if seq is None:
        # One document per row, said explicitly: the kernels are autotuned per key, and the key records whether a
        # seq_idx is given, so without this a process that trains on packed rows and then on padded ones (KD then
        # DPO) tunes every kernel twice (~75 s of a fresh H100's first DPO step). The result is the same.
        seq = torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device)
    # dt is final (softplus and pad zeros applied by us), so no dt_bias and no kernel softplus.
    y, final_state = k.chunk_scan(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state, seq_idx=seq,
                                  dt_softplus=False, return_final_states=True)
    return y, final_state


def state_update(state, x, dt, A, B, C, D, backend="torch", dt_bias=None):
    """Decode one token, updating `state` [B, H, P, N] in place. Returns y [B, H, P] in x's dtype.

    `dt` is final (softplus applied, zero at pads) unless `dt_bias` [H] is given: then it is the raw step and
    softplus(dt + dt_bias) is applied in the step (inside the kernel on CUDA, saving its separate launches).
    Nothing reads a tensor on the host: the step can be recorded in a CUDA graph."""
    if backend == "torch":
        y, new = ssd_step(state, x, dt, A, B, C, D, dt_bias=dt_bias)
        state.copy_(new)
        return y
    k = mamba_ssm_kernels()
    b, h, p = x.shape
    n = B.shape[-1]
    # Per-head scalars broadcast over headdim (and d_state) with stride 0: the kernel's "tie_hdim" fast path.
    # Without a real dt_bias a zero one keeps its stride check happy (dt is final already).
    A_ = A.float()[:, None, None].expand(h, p, n)
    dt_ = dt[..., None].expand(b, h, p)
    softplus = dt_bias is not None
    if dt_bias is None:
        dt_bias = torch.zeros(h, 1, device=x.device, dtype=torch.float32).expand(h, p)
    else:
        dt_bias = dt_bias.float()[:, None].expand(h, p)
    D_ = None if D is None else D[:, None].expand(h, p)
    return k.state_update(state, x, dt_, A_, B, C, D=D_, z=None, dt_bias=dt_bias, dt_softplus=softplus)


def conv1d(xBC, weight, bias=None, seq_idx=None, conv_state=None, activation=True, backend="torch"):
    """The causal conv of `causal_conv1d_torch`, through causal-conv1d's kernel where it can do it."""
    k = causal_conv1d_kernels() if backend == "mamba_ssm" else None
    W = weight.shape[-1]
    # causal_conv1d takes seq_idx or initial states, not both, and widths 2..4.
    if k is not None and 2 <= W <= 4 and (seq_idx is None or conv_state is None):
        x = xBC.contiguous().transpose(1, 2)  # [B, D, L] channel-last, which seq_idx and states need
        init = None
        if conv_state is not None:
            init = conv_state[..., -(W - 1):].to(xBC.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        seq = None if seq_idx is None else monotone_seq_idx(seq_idx).contiguous()
        out = k.conv(x, weight, bias, seq_idx=seq, initial_states=init, activation="silu" if activation else None)
        return out.transpose(1, 2)
    return causal_conv1d_torch(xBC, weight, bias, seq_idx=seq_idx, conv_state=conv_state, activation=activation)


def conv_update(x, conv_state, weight, bias=None, activation=True, backend="torch", fused=False):
    """Decode one token through the conv, updating `conv_state` [B, D, W] in place. Returns [B, D].
    `fused` (dispatch.fused_inference): without causal-conv1d, one Triton kernel instead of eight torch ones."""
    k = causal_conv1d_kernels() if backend == "mamba_ssm" else None
    if k is not None and conv_state.dtype == x.dtype and conv_state.shape[-1] >= weight.shape[-1] - 1:
        return k.update(x, conv_state, weight, bias, activation="silu" if activation else None)
    if fused:
        return fused_conv_update(x, conv_state, weight, bias, activation)
    out, new_state = conv_step(x, conv_state, weight, bias, activation)
    conv_state.copy_(new_state)
    return out


def gated_rmsnorm(y, z, weight, eps, group_size, backend="torch"):
    """RMSNorm_group(y * SiLU(z)) * weight (mamba_ssm's norm_before_gate=False), in y's dtype."""
    k = mamba_ssm_kernels() if backend == "mamba_ssm" else None
    if k is not None and k.gated_rmsnorm is not None:
        return k.gated_rmsnorm(y, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
    cd = _compute_dtype(y.dtype)
    g = y.to(cd) * F.silu(z.to(cd))
    shape = g.shape
    g = g.view(*shape[:-1], -1, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.view(shape) * weight.to(cd)).to(y.dtype)
