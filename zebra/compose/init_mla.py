"""Initialise MLA and Mamba2 mixers from a base Llama attention layer (METHOD.md §3).

MLA by SVD: the query projection and the stacked key/value projection are each factorised W = U S V^T and
truncated to their ranks; the singular values go into the down-projection (q_a, kv_a), U into the
up-projection (q_b, kv_b), whose rows are re-ordered per head into MLA's [nope dims; rope dims] layout.
- plain: the SVD of W itself (the best rank-r W' in ||W - W'||_F).
- activation-aware: with C the second moment E[x x^T] of the layer's inputs, the SVD of W C^{1/2}, whose
  truncation is the best rank-r W' in ||(W - W') C^{1/2}||_F = the error of the projected activations
  E||(W - W') x||^2; the whitening is undone on the down-projection (V^T C^{-1/2}). C's eigenvalues are floored
  at a small fraction of the largest (a singular C from few calibration rows or dead input dims), and the whole
  factorisation runs in float64.
The RoPE key: `rope_key: shared` takes the mean over KV heads of the base keys' rope rows (one key for all
heads); `per_kv_head` copies each KV head's rope rows into its own slot (exact).

Mamba2 from attention: the linear-attention duality C<->Q, B<->K, x<->V, out_proj<->W_o; optionally an
identity depthwise conv (the current tap 1, the others 0, no bias), so that x, B and C reach the scan as the
attention's V, K and Q of the same token rather than through a random filter.

Plain factorisations run in float32 (float64 when the weights are float64), whatever the module's dtype.
"""

from __future__ import annotations

import torch

from zebra.model.rope import mla_rope_dims


def _compute_dtype(*weights: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


def _rel(delta: torch.Tensor, ref: torch.Tensor) -> float:
    return float(delta.norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny))


def truncation_error(s: torch.Tensor, rank: int) -> float:
    """sqrt(sum_{i >= rank} s_i^2) / ||W||_F from the singular values s of W (||W||_F^2 = sum s_i^2)."""
    s = s.double()
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def head_row_index(n_heads: int, head_dim: int, dims: list[int]) -> torch.Tensor:
    """Row indices into a [n_heads * head_dim, ...] projection picking `dims` of every head, head by head."""
    dims_t = torch.as_tensor(dims, dtype=torch.long)
    return (torch.arange(n_heads)[:, None] * head_dim + dims_t[None, :]).reshape(-1)


EIG_FLOOR = 1e-6  # C's eigenvalues are floored at this fraction of its largest before C^{1/2} is inverted


def whitening(covariance: torch.Tensor, eig_floor: float = EIG_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^{1/2}, C^{-1/2}) of a symmetric PSD [H, H] matrix, in float64, eigenvalues floored at
    `eig_floor` x the largest (so a singular or rank-deficient C still gives a finite inverse)."""
    c = covariance.detach().double()
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"input covariance must be a square matrix, got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError("input covariance has non-finite entries")
    evals, evecs = torch.linalg.eigh((c + c.T) / 2)
    top = float(evals.max())
    if top <= 0:
        raise ValueError("input covariance is zero (no calibration tokens reached this layer?)")
    evals = evals.clamp_min(eig_floor * top)
    return (evecs * evals.sqrt()) @ evecs.T, (evecs * evals.rsqrt()) @ evecs.T


def low_rank_factors(w: torch.Tensor, rank: int, whiten: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(up [out, rank], down [rank, in], singular values of the factorised matrix) with up @ down the rank-`rank`
    approximation of w: plain (SVD of w) or, given `whiten` = (C^{1/2}, C^{-1/2}), activation-aware (SVD of
    w C^{1/2}, down-projection times C^{-1/2}; in float64)."""
    if whiten is None:
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank, None] * vt[:rank], s
    root, inv_root = whiten
    u, s, vt = torch.linalg.svd(w.double() @ root, full_matrices=False)
    return u[:, :rank], (s[:rank, None] * vt[:rank]) @ inv_root, s


@torch.no_grad()
def init_mla_from_attention(mla, q_proj_w: torch.Tensor, k_proj_w: torch.Tensor, v_proj_w: torch.Tensor,
                            o_proj_w: torch.Tensor, config, input_covariance: torch.Tensor | None = None) -> dict:
    """Fill an MLA mixer (q_a/q_b/kv_a/kv_b/o projections) from a Llama attention's weights; return a report.

    Shapes: q [h*hd, H], k and v [g*hd, H], o [H, h*hd]. `input_covariance` [H, H]: E[x x^T] of the attention's
    inputs (after the input RMSNorm) on calibration rows; given, the factorisations are activation-aware (module
    docstring), else plain. The report holds, per factorisation, the truncation error sqrt(sum_{i>r} s_i^2)/||.||_F
    of the factorised matrix and the effective relative errors of what MLA actually computes with (unweighted).
    """
    h, g, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    d_rope, d_nope, d_v = config.qk_rope_head_dim, config.qk_nope_head_dim, config.v_head_dim
    r_q, r_kv = config.q_lora_rank, config.kv_lora_rank
    hidden = config.hidden_size
    if d_v != hd:
        raise ValueError(f"v_head_dim ({d_v}) must equal head_dim ({hd}) to initialise MLA values from the base")
    for name, w, shape in (("q_proj", q_proj_w, (h * hd, hidden)), ("k_proj", k_proj_w, (g * hd, hidden)),
                           ("v_proj", v_proj_w, (g * hd, hidden)), ("o_proj", o_proj_w, (hidden, h * hd))):
        if tuple(w.shape) != shape:
            raise ValueError(f"{name} weight has shape {tuple(w.shape)}, expected {shape} for this config")

    whiten = None
    if input_covariance is not None:
        if tuple(input_covariance.shape) != (hidden, hidden):
            raise ValueError(f"input covariance has shape {tuple(input_covariance.shape)}, expected "
                             f"{(hidden, hidden)} (the attention's input width)")
        whiten = whitening(input_covariance)
    dtype = torch.float64 if whiten is not None else _compute_dtype(q_proj_w, k_proj_w, v_proj_w, o_proj_w)
    wq, wk, wv, wo = (w.detach().to(dtype) for w in (q_proj_w, k_proj_w, v_proj_w, o_proj_w))
    nope_dims, rope_dims = mla_rope_dims(config.mla_rope, hd, d_rope)

    # ---- queries: W_q (C^{1/2}) = U S V^T; q_a = S V^T (C^{-1/2}) (first r_q), q_b = U, rows [nope; rope] per head
    u, q_a, s = low_rank_factors(wq, r_q, whiten)
    q_rows = head_row_index(h, hd, nope_dims + rope_dims)
    q_b = u[q_rows]
    q_trunc = truncation_error(s, r_q)

    # ---- keys/values jointly: [W_k; W_v] (g heads each), factorised the same way; kv_a's latent rows = q_a's kin
    wkv = torch.cat([wk, wv], dim=0)
    u2, kv_a_latent, s2 = low_rank_factors(wkv, r_kv, whiten)
    # kv_b rows per KV head: [its key rows of U at the nope dims; its value rows of U]
    k_nope_rows = head_row_index(g, hd, nope_dims).view(g, d_nope)
    v_rows = g * hd + head_row_index(g, hd, list(range(hd))).view(g, hd)
    kv_b_rows = torch.cat([k_nope_rows, v_rows], dim=1).reshape(-1)
    kv_b = u2[kv_b_rows]
    kv_trunc = truncation_error(s2, r_kv)

    # ---- the RoPE key from the base key rows at the rope dims (in MLA rope order): their mean over KV heads
    # (shared), or every KV head's own in its slot (per_kv_head)
    k_rope_per_head = wk[head_row_index(g, hd, rope_dims)].view(g, d_rope, hidden)
    if config.rope_key == "per_kv_head":
        k_rope_used = k_rope_per_head
    else:
        k_rope_used = k_rope_per_head.mean(dim=0, keepdim=True)
    kv_a = torch.cat([kv_a_latent, k_rope_used.reshape(-1, hidden)], dim=0)

    for lin, w in ((mla.q_a_proj, q_a), (mla.q_b_proj, q_b), (mla.kv_a_proj, kv_a), (mla.kv_b_proj, kv_b),
                   (mla.o_proj, wo)):
        if tuple(lin.weight.shape) != tuple(w.shape):
            raise ValueError(f"MLA module has a {tuple(lin.weight.shape)} projection where {tuple(w.shape)} is "
                             "needed: module and config disagree")
        lin.weight.copy_(w.to(lin.weight.dtype))

    # ---- effective errors of what MLA uses (from the factors as computed, before the cast to the module dtype)
    q_target = wq[q_rows]
    q_eff = _rel(q_b @ q_a - q_target, q_target)
    kv_up = (kv_b @ kv_a_latent).view(g, d_nope + d_v, hidden)
    k_nope_target = wk[k_nope_rows.reshape(-1)].view(g, d_nope, hidden)
    v_target = wv.view(g, hd, hidden)
    k_nope_eff = _rel(kv_up[:, :d_nope] - k_nope_target, k_nope_target)
    v_eff = _rel(kv_up[:, d_nope:] - v_target, v_target)
    rope_eff = _rel(k_rope_used - k_rope_per_head, k_rope_per_head)
    return {
        "q_truncation": q_trunc, "kv_truncation": kv_trunc,
        "q_effective": q_eff, "k_nope_effective": k_nope_eff, "v_effective": v_eff,
        "k_rope_effective": rope_eff,
        "q_rank": r_q, "kv_rank": r_kv, "q_full_rank": int(s.numel()), "kv_full_rank": int(s2.numel()),
        "svd": "activation_aware" if whiten is not None else "plain",
    }


MAMBA_CONV_INITS = ("default", "identity")


@torch.no_grad()
def identity_conv_(conv) -> None:
    """Make a depthwise causal conv [channels, 1, d_conv] a pass-through of its current input: the last tap
    (the one that multiplies the current token) 1, the earlier taps and the bias 0."""
    conv.weight.zero_()
    conv.weight[..., -1] = 1.0
    if conv.bias is not None:
        conv.bias.zero_()


@torch.no_grad()
def init_mamba_from_attention(mamba, q_proj_w: torch.Tensor, k_proj_w: torch.Tensor, v_proj_w: torch.Tensor,
                              o_proj_w: torch.Tensor, conv: str = "default") -> dict:
    """Copy attention weights into an attention-shaped Mamba2 mixer: in_proj's x rows <- W_v, B rows <- W_k,
    C rows <- W_q, out_proj <- W_o. `conv`: "default" keeps the mixer's own (random) conv, "identity" makes it
    a pass-through of the current token (`identity_conv_`). The z and dt rows, dt_bias, A_log, D and the norm keep
    the mixer's own (default) initialisation. Returns the in_proj row ranges of each part."""
    if conv not in MAMBA_CONV_INITS:
        raise ValueError(f"mamba conv init must be one of {list(MAMBA_CONV_INITS)}, got {conv!r}")
    w_in, w_out = mamba.in_proj.weight, mamba.out_proj.weight
    hidden, d_inner = w_out.shape  # z has d_inner rows
    d_xb, d_c = k_proj_w.shape[0], q_proj_w.shape[0]  # x and B at g*hd, C at h*hd
    nheads = w_in.shape[0] - d_inner - 2 * d_xb - d_c  # whatever is left is dt
    fits = (v_proj_w.shape[0] == d_xb and d_c == d_inner and nheads > 0 and w_in.shape[1] == hidden
            and all(w.shape[1] == hidden for w in (q_proj_w, k_proj_w, v_proj_w))
            and tuple(o_proj_w.shape) == (hidden, d_inner))
    if not fits:
        raise ValueError(
            f"attention weights q {tuple(q_proj_w.shape)}, k {tuple(k_proj_w.shape)}, v {tuple(v_proj_w.shape)}, "
            f"o {tuple(o_proj_w.shape)} do not fit a Mamba2 mixer with in_proj {tuple(w_in.shape)} and out_proj "
            f"{tuple(w_out.shape)} (needs d_inner = h*hd, d_xb = g*hd, d_state = hd)")
    # in_proj output order: [z (d_inner), x (d_xb), B (d_xb), C (d_inner), dt (nheads)]
    x0, b0, c0, dt0 = d_inner, d_inner + d_xb, d_inner + 2 * d_xb, d_inner + 2 * d_xb + d_c
    w_in[x0:b0].copy_(v_proj_w.to(w_in.dtype))
    w_in[b0:c0].copy_(k_proj_w.to(w_in.dtype))
    w_in[c0:dt0].copy_(q_proj_w.to(w_in.dtype))
    w_out.copy_(o_proj_w.to(w_out.dtype))
    if conv == "identity":
        identity_conv_(mamba.conv1d)
    return {"z_rows": (0, x0), "x_rows": (x0, b0), "B_rows": (b0, c0), "C_rows": (c0, dt0),
            "dt_rows": (dt0, dt0 + nheads)}
