"""The initialisations that use the base's activations or keep more of its structure (conf/init/, rope_key),
each against a float64 reference written here from its definition."""

import math

import pytest
import torch

from zebra.compose.calibration import (attention_input_covariances, calibration_rows, check_init_options,
                                       match_mamba_output_scales)
from zebra.compose.init_mla import identity_conv_, init_mla_from_attention, whitening
from zebra.compose.students import build_student
from zebra.model.configuration_zebra import ZebraConfig
from zebra.model.mamba2 import Mamba2Mixer
from zebra.model.mla import MultiHeadLatentAttention
from zebra.model.rope import base_inv_freq, rotate_half


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def anisotropic_covariance(hidden, n, rank=None, seed=0):
    """X^T X / n of inputs whose dims have very different scales (as LLM activations have outlier dims);
    `rank` < hidden gives a singular C (fewer independent directions than dims)."""
    gen = torch.Generator().manual_seed(seed)
    k = rank or hidden
    mix = torch.randn(k, hidden, generator=gen, dtype=torch.float64)
    scales = torch.logspace(1, -2, k, dtype=torch.float64)[:, None]
    x = torch.randn(n, k, generator=gen, dtype=torch.float64) @ (scales * mix)
    return x.T @ x / n


def attention(h, g, hd, hidden, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(r, c, generator=gen, dtype=torch.float64) / math.sqrt(c)
          for r, c in ((h * hd, hidden), (g * hd, hidden), (g * hd, hidden), (hidden, h * hd))]
    return ws


def config(h=4, g=2, hd=16, hidden=64, **kw):
    return ZebraConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                       num_attention_heads=h, num_key_value_heads=g, head_dim=hd, **kw)  # one layer, MLA


def reconstructed(mla, cfg):
    """(W_q' in MLA row order [h*hd, H], [W_k'; W_v'] of the nope/value rows [g*(dn+dv), H]) of an MLA module."""
    q = mla.q_b_proj.weight.double() @ mla.q_a_proj.weight.double()
    kv = mla.kv_b_proj.weight.double() @ mla.kv_a_proj.weight.double()[:cfg.kv_lora_rank]
    return q, kv


def mla_row_targets(wq, wk, wv, cfg):
    from zebra.model.rope import mla_rope_dims

    h, g, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    nope, rope = mla_rope_dims(cfg.mla_rope, hd, cfg.qk_rope_head_dim)
    q = wq.view(h, hd, -1)[:, nope + rope].reshape(h * hd, -1)
    kv = torch.cat([wk.view(g, hd, -1)[:, nope], wv.view(g, hd, -1)], dim=1).reshape(-1, wk.shape[1])
    return q, kv


def weighted_error(w_approx, w, cov):
    """||(W - W') C^{1/2}||_F = sqrt(tr((W - W') C (W - W')^T)): the activation error E||(W - W') x||^2."""
    d = (w - w_approx).detach().double()
    return float(torch.trace(d @ cov @ d.T).clamp_min(0).sqrt())


def tail_optimum(w, cov, rank):
    """The smallest weighted error any rank-`rank` W' can reach: with C = L L^T (Cholesky, an independent square
    root), ||(W - W') C^{1/2}|| = ||(W - W') L|| and Eckart-Young on W L gives sqrt(sum_{i >= rank} s_i^2)."""
    lower = torch.linalg.cholesky(cov)
    s = torch.linalg.svdvals(w @ lower)
    return float(s[rank:].square().sum().sqrt())


def test_whitening_is_the_square_root_and_floors_a_singular_covariance():
    cov = anisotropic_covariance(32, 500)
    root, inv_root = whitening(cov, eig_floor=0.0)
    assert rel(root @ root, cov) < 1e-10 and rel(root @ inv_root, torch.eye(32, dtype=torch.float64)) < 1e-8
    singular = anisotropic_covariance(32, 500, rank=10)
    root, inv_root = whitening(singular)
    assert torch.isfinite(inv_root).all() and rel(root @ root, singular) < 1e-5
    with pytest.raises(ValueError, match="zero"):
        whitening(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="square"):
        whitening(torch.zeros(4, 3))


@pytest.mark.parametrize("r_q,r_kv", [(24, 12), (40, 20)])
def test_activation_aware_svd_minimises_the_weighted_error(r_q, r_kv):
    cfg = config(q_lora_rank=r_q, kv_lora_rank=r_kv)
    wq, wk, wv, wo = attention(4, 2, 16, 64)
    cov = anisotropic_covariance(64, 2000)
    q_target, kv_target = mla_row_targets(wq, wk, wv, cfg)

    plain = MultiHeadLatentAttention(cfg, 0).double()
    init_mla_from_attention(plain, wq, wk, wv, wo, cfg)
    aware = MultiHeadLatentAttention(cfg, 0).double()
    rep = init_mla_from_attention(aware, wq, wk, wv, wo, cfg, input_covariance=cov)
    assert rep["svd"] == "activation_aware"

    for approx_plain, approx_aware, target, rank, w in zip(reconstructed(plain, cfg), reconstructed(aware, cfg),
                                                          (q_target, kv_target), (r_q, r_kv),
                                                          (wq, torch.cat([wk, wv]))):
        best = tail_optimum(w, cov, rank)
        assert weighted_error(approx_aware, target, cov) <= best * (1 + 1e-6) + 1e-12
        assert weighted_error(approx_plain, target, cov) > 1.2 * best  # far from optimal on anisotropic inputs
        # and the other way round: the plain SVD is the better one in the unweighted norm
        assert (approx_plain - target).norm() <= (approx_aware - target).norm()


def test_activation_aware_svd_on_a_singular_covariance_is_finite_and_better():
    cfg = config(q_lora_rank=24, kv_lora_rank=12)
    wq, wk, wv, wo = attention(4, 2, 16, 64, seed=1)
    cov = anisotropic_covariance(64, 2000, rank=20)  # 20 directions in 64 dims
    q_target, kv_target = mla_row_targets(wq, wk, wv, cfg)
    plain, aware = MultiHeadLatentAttention(cfg, 0).double(), MultiHeadLatentAttention(cfg, 0).double()
    init_mla_from_attention(plain, wq, wk, wv, wo, cfg)
    init_mla_from_attention(aware, wq, wk, wv, wo, cfg, input_covariance=cov)
    assert all(torch.isfinite(p).all() for p in aware.parameters())
    for approx_plain, approx_aware, target in zip(reconstructed(plain, cfg), reconstructed(aware, cfg),
                                                  (q_target, kv_target)):
        assert weighted_error(approx_aware, target, cov) < 0.5 * weighted_error(approx_plain, target, cov)
    with pytest.raises(ValueError, match="covariance has shape"):
        init_mla_from_attention(aware, wq, wk, wv, wo, cfg, input_covariance=cov[:10, :10])


def naive_llama_attention(x, wq, wk, wv, wo, h, g, hd, rope_parameters):
    """The base's GQA attention from the definition, float64 throughout (rotate_half RoPE on every dim)."""
    b, t, _ = x.shape
    q = (x @ wq.T).view(b, t, h, hd)
    k = (x @ wk.T).view(b, t, g, hd)
    v = (x @ wv.T).view(b, t, g, hd)
    inv = base_inv_freq(rope_parameters, hd).double()
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    group = [j * g // h for j in range(h)]
    scores = torch.einsum("bthd,bshd->bhts", q, k[:, :, group]) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v[:, :, group])
    return out.reshape(b, t, h * hd) @ wo.T


@pytest.mark.parametrize("rope_key,exact", [("per_kv_head", True), ("shared", False)])
def test_per_kv_head_rope_key_at_full_rank_is_the_base_attention(rope_key, exact):
    """Full rank, every rotary pair a rope dim, 2 KV heads: with one rope key slot per KV head the MLA layer is
    the base attention (float64, to rounding); the one shared (averaged) key is not."""
    h, g, hd, hidden = 4, 2, 16, 96
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = config(h, g, hd, hidden, qk_rope_head_dim=hd, qk_nope_head_dim=0, rope_key=rope_key,
                 rope_parameters=rope)
    assert cfg.kv_lora_rank == 2 * g * hd  # full rank
    wq, wk, wv, wo = attention(h, g, hd, hidden, seed=2)
    wq, wk = 3 * wq, 3 * wk  # sharper attention
    mla = MultiHeadLatentAttention(cfg, 0).double()
    rep = init_mla_from_attention(mla, wq, wk, wv, wo, cfg)
    x = torch.randn(2, 10, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = naive_llama_attention(x, wq, wk, wv, wo, h, g, hd, rope)
    out = mla(x, torch.arange(10).expand(2, 10))
    if exact:
        assert rep["k_rope_effective"] == 0.0 and rel(out, ref) < 1e-10
    else:
        assert rep["k_rope_effective"] > 0.1 and rel(out, ref) > 1e-3


def test_identity_conv_passes_the_current_input_through():
    cfg = ZebraConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    mixer = Mamba2Mixer(cfg, 0).double()
    identity_conv_(mixer.conv1d)
    xbc = torch.randn(2, 9, cfg.mamba_conv_dim, dtype=torch.float64)
    assert torch.equal(mixer.conv1d(xbc, activation=False), xbc)
    assert torch.allclose(mixer.conv1d(xbc, activation=True), torch.nn.functional.silu(xbc), atol=1e-15)
    # and one decode step with a history in the conv state: still the current token only
    state = torch.randn(2, cfg.mamba_conv_dim, cfg.mamba_d_conv, dtype=torch.float64)
    step = mixer.conv1d(xbc[:, :1], conv_state=state, decode=True, activation=False)
    assert torch.equal(step, xbc[:, :1])


def test_build_student_options_end_to_end(tiny_llama):
    base = tiny_llama(g=2, h=4, hd=16, hidden=64, layers=3)
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 97, (1, 30), generator=gen)} for _ in range(4)]
    ids = torch.randint(3, 97, (2, 20), generator=gen)
    kw = {"q_lora_rank": 24, "kv_lora_rank": 12}

    # covariances: E[x x^T] of the input RMSNorm's output, from the hidden states (another path than the hooks)
    covs = attention_input_covariances(base, rows)
    for i, layer in enumerate(base.model.layers):
        xs = torch.cat([layer.input_layernorm(base.model(**r, output_hidden_states=True).hidden_states[i])[0]
                        for r in rows])
        assert rel(covs[i], xs.T @ xs / xs.shape[0]) < 1e-12

    aware, rep = build_student(base, kw, "mla", init={"mla_svd": "activation_aware"}, calibration=rows)
    assert rep["init"] == {"mla_svd": "activation_aware"} and rep["calibration_tokens"] == 120
    plain, _ = build_student(base, kw, "mla")
    x_err = {}
    for name, student in (("aware", aware), ("plain", plain)):  # the q projection's error on the inputs
        err = 0.0
        for i, layer in enumerate(base.model.layers):
            q_t, _ = mla_row_targets(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
                                     layer.self_attn.v_proj.weight, student.config)
            q, _ = reconstructed(student.model.layers[i].mixer, student.config)
            err += weighted_error(q, q_t, covs[i])
        x_err[name] = err
    assert x_err["aware"] < x_err["plain"]

    torch.manual_seed(1)
    mamba, rep = build_student(base, kw, "mamba", init={"mamba_conv": "identity", "mamba_scale": "matched"},
                               calibration=rows)
    assert all(torch.equal(layer.mixer.conv1d.weight[..., :-1], torch.zeros_like(layer.mixer.conv1d.weight[..., :-1]))
               and bool((layer.mixer.conv1d.weight[..., -1] == 1).all()) for layer in mamba.model.layers)
    assert all(r["out_scale"] > 0 for r in rep["layers"])
    # after the scale, each mixer's output has the attention output's RMS on the calibration rows
    again = match_mamba_output_scales(base, mamba, rows, apply=False)
    assert again == pytest.approx([1.0] * 3, rel=1e-9)
    assert torch.isfinite(mamba(ids).logits).all()

    with pytest.raises(ValueError, match="calibration"):
        build_student(base, kw, "mamba", init={"mamba_scale": "matched"})
    # an option that the kind does not use needs no rows
    build_student(base, kw, "mla", init={"mamba_scale": "matched"})


def test_check_init_options():
    assert check_init_options(None) == {"mla_svd": "plain", "calibration_rows": 0, "mamba_conv": "default",
                                        "mamba_scale": "none"}
    with pytest.raises(ValueError, match="mla_svd"):
        check_init_options({"mla_svd": "awq"})
    with pytest.raises(ValueError, match="unknown init option"):
        check_init_options({"mla_svds": "plain"})
    with pytest.raises(ValueError, match="calibration_rows"):
        check_init_options({"calibration_rows": -1})
    with pytest.raises(ValueError, match="calibration_rows > 0"):
        check_init_options({"mamba_scale": "matched", "calibration_rows": 0}, from_config=True)


def test_calibration_rows_cut_packed_padded_batches_into_documents():
    ids = torch.arange(1, 13).view(2, 6)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    rows = calibration_rows([{"input_ids": ids, "position_ids": pos, "attention_mask": mask}])
    assert [r["input_ids"].tolist() for r in rows] == [[[1, 2, 3]], [[4, 5, 6]], [[7, 8, 9, 10]]]
    assert len(calibration_rows([{"input_ids": ids}], n_rows=1)) == 1
