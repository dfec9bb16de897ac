"""SVD initialisation of MLA and the attention -> Mamba2 mapping (METHOD §3), against float64 references
written here from the definitions."""

import math

import pytest
import torch

from zebra.compose.init_mla import init_mamba_from_attention, init_mla_from_attention
from zebra.model.configuration_zebra import ZebraConfig
from zebra.model.mamba2 import Mamba2Mixer
from zebra.model.mla import MultiHeadLatentAttention


def my_rope_dims(variant, hd, d_rope):
    """Independent statement of METHOD §2.2's layouts (not zebra.model.rope)."""
    if variant == "reference":
        return [i for i in range(hd - d_rope)], [hd - d_rope + i for i in range(d_rope)]
    rope = [i for i in range(d_rope // 2)] + [hd // 2 + i for i in range(d_rope // 2)]
    return [i for i in range(hd) if i not in rope], rope


def attention_weights(h, g, hd, hidden, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(h * hd, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
    k = torch.randn(g * hd, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
    v = torch.randn(g * hd, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden)
    o = torch.randn(hidden, h * hd, generator=gen, dtype=torch.float64) / math.sqrt(h * hd)
    return [w.to(dtype) for w in (q, k, v, o)]


def mla_config(h, g, hd, hidden, variant, **kw):
    return ZebraConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                       num_attention_heads=h, num_key_value_heads=g, head_dim=hd, mla_rope=variant,
                       hybrid_layer_types=["mla"], **kw)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def test_rope_dims_match_method():
    from zebra.model.rope import mla_rope_dims
    for variant in ("pairs", "reference"):
        for hd, d_rope in ((16, 8), (64, 32), (128, 64), (16, 16), (16, 4)):
            assert tuple(mla_rope_dims(variant, hd, d_rope)) == my_rope_dims(variant, hd, d_rope)


@pytest.mark.parametrize("variant", ["pairs", "reference"])
@pytest.mark.parametrize("h,g,hd,hidden", [(4, 2, 16, 48), (4, 2, 16, 96), (6, 3, 16, 64), (4, 4, 16, 64)])
def test_full_rank_reproduces_projections_fp32(variant, h, g, hd, hidden):
    """At r_q = min(h*hd, H), r_kv = min(2*g*hd, H): W_q, the k-nope rows and the v rows come back to < 1e-5."""
    cfg = mla_config(h, g, hd, hidden, variant)
    assert (cfg.q_lora_rank, cfg.kv_lora_rank) == (min(h * hd, hidden), min(2 * g * hd, hidden))
    mla = MultiHeadLatentAttention(cfg, 0).float()
    wq, wk, wv, wo = attention_weights(h, g, hd, hidden)
    rep = init_mla_from_attention(mla, wq, wk, wv, wo, cfg)
    nope, rope = my_rope_dims(variant, hd, cfg.qk_rope_head_dim)
    d_nope, r_kv = len(nope), cfg.kv_lora_rank

    q = (mla.q_b_proj.weight @ mla.q_a_proj.weight).view(h, hd, hidden)
    q_target = wq.view(h, hd, hidden)[:, nope + rope]
    assert rel(q, q_target) < 1e-5

    kv = (mla.kv_b_proj.weight @ mla.kv_a_proj.weight[:r_kv]).view(g, d_nope + hd, hidden)
    assert rel(kv[:, :d_nope], wk.view(g, hd, hidden)[:, nope]) < 1e-5
    assert rel(kv[:, d_nope:], wv.view(g, hd, hidden)) < 1e-5

    # the shared rope key: mean over KV heads of the base key rows at the rope dims, in rope order
    k_rope = wk.double().view(g, hd, hidden)[:, rope].mean(0)
    assert rel(mla.kv_a_proj.weight[r_kv:], k_rope) < 1e-6
    assert rel(mla.o_proj.weight, wo) == 0.0

    assert rep["q_truncation"] < 1e-6 and rep["kv_truncation"] < 1e-6
    for key in ("q_effective", "k_nope_effective", "v_effective"):
        assert rep[key] < 1e-5
    # the rope error of the shared key against each head's rope rows (0 only when g == 1)
    per_head = wk.double().view(g, hd, hidden)[:, rope]
    assert rep["k_rope_effective"] == pytest.approx(rel(k_rope[None].expand_as(per_head), per_head), rel=1e-5)


@pytest.mark.parametrize("variant", ["pairs", "reference"])
@pytest.mark.parametrize("r_q,r_kv", [(20, 12), (7, 30), (1, 1)])
def test_truncation_error_matches_float64_svd(variant, r_q, r_kv):
    h, g, hd, hidden = 4, 2, 16, 48
    cfg = mla_config(h, g, hd, hidden, variant, q_lora_rank=r_q, kv_lora_rank=r_kv)
    mla = MultiHeadLatentAttention(cfg, 0)
    wq, wk, wv, wo = attention_weights(h, g, hd, hidden, seed=3)
    rep = init_mla_from_attention(mla, wq, wk, wv, wo, cfg)

    def trunc(w, r):
        s = torch.linalg.svdvals(w.double())
        return math.sqrt(float((s[r:] ** 2).sum())) / float(w.double().norm())

    expected_q, expected_kv = trunc(wq, r_q), trunc(torch.cat([wk, wv]), r_kv)
    assert rep["q_truncation"] == pytest.approx(expected_q, rel=1e-5, abs=1e-7)
    assert rep["kv_truncation"] == pytest.approx(expected_kv, rel=1e-5, abs=1e-7)
    # the query factorisation is used whole (rows only permuted), so its effective error is the truncation error
    assert rep["q_effective"] == pytest.approx(expected_q, rel=1e-4)
    # the best rank-r approximation: the MLA product is exactly the truncated SVD
    nope, rope = my_rope_dims(variant, hd, cfg.qk_rope_head_dim)
    q = (mla.q_b_proj.weight @ mla.q_a_proj.weight).double().view(h, hd, hidden)
    assert rel(q, wq.view(h, hd, hidden)[:, nope + rope]) == pytest.approx(expected_q, rel=1e-4)
    # the k-nope and v errors together are bounded by the joint truncation error
    kv_err2 = rep["k_nope_effective"] ** 2 * float(wk.view(g, hd, hidden)[:, nope].double().norm() ** 2) \
        + rep["v_effective"] ** 2 * float(wv.double().norm() ** 2)
    assert math.sqrt(kv_err2) <= expected_kv * float(torch.cat([wk, wv]).double().norm()) * (1 + 1e-4)


def test_float64_weights_factorise_in_float64():
    cfg = mla_config(4, 2, 16, 48, "pairs")
    mla = MultiHeadLatentAttention(cfg, 0).double()
    rep = init_mla_from_attention(mla, *attention_weights(4, 2, 16, 48, dtype=torch.float64), cfg)
    assert rep["q_effective"] < 1e-13 and rep["v_effective"] < 1e-13 and rep["k_nope_effective"] < 1e-13


def test_bad_shapes_raise():
    cfg = mla_config(4, 2, 16, 48, "pairs")
    mla = MultiHeadLatentAttention(cfg, 0)
    wq, wk, wv, wo = attention_weights(4, 1, 16, 48)  # one KV head where the config says two
    with pytest.raises(ValueError, match="k_proj"):
        init_mla_from_attention(mla, wq, wk, wv, wo, cfg)


def mamba_config(h, g, hd, hidden):
    return ZebraConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                       num_attention_heads=h, num_key_value_heads=g, head_dim=hd, hybrid_layer_types=["mamba"])


def test_mamba_rows_and_defaults_kept():
    h, g, hd, hidden = 4, 2, 8, 32
    cfg = mamba_config(h, g, hd, hidden)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg, 0)
    before = {k: v.clone() for k, v in mixer.state_dict().items()}
    wq, wk, wv, wo = attention_weights(h, g, hd, hidden)
    init_mamba_from_attention(mixer, wq, wk, wv, wo)
    w = mixer.in_proj.weight
    d_inner, d_xb = h * hd, g * hd
    assert torch.equal(w[d_inner:d_inner + d_xb], wv)
    assert torch.equal(w[d_inner + d_xb:d_inner + 2 * d_xb], wk)
    assert torch.equal(w[d_inner + 2 * d_xb:2 * d_inner + 2 * d_xb], wq)
    assert torch.equal(mixer.out_proj.weight, wo)
    # z rows, dt rows and everything else untouched
    assert torch.equal(w[:d_inner], before["in_proj.weight"][:d_inner])
    assert torch.equal(w[2 * d_inner + 2 * d_xb:], before["in_proj.weight"][2 * d_inner + 2 * d_xb:])
    for key in ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight"):
        assert torch.equal(mixer.state_dict()[key], before[key]), key


@pytest.mark.parametrize("g", [1, 2, 4])
def test_mamba_mapping_is_linear_attention(g):
    """METHOD §3: decay off, dt = 1, identity conv without SiLU, D = 0, gated norm bypassed ->
    o_t = W_o sum_{s<=t} (q_t . k_s) v_s with head j reading KV head floor(j*g/h)."""
    h, hd, hidden, t = 4, 8, 32, 7
    cfg = mamba_config(h, g, hd, hidden)
    mixer = Mamba2Mixer(cfg, 0).double()
    wq, wk, wv, wo = attention_weights(h, g, hd, hidden, dtype=torch.float64, seed=5)
    rows = init_mamba_from_attention(mixer, wq, wk, wv, wo)
    with torch.no_grad():
        mixer.in_proj.weight[rows["dt_rows"][0]:rows["dt_rows"][1]] = 0
        mixer.dt_bias.fill_(math.log(math.e - 1))  # softplus(0 + dt_bias) = 1
        mixer.A_log.fill_(-math.inf)  # A = -exp(A_log) = 0: no decay
        mixer.conv1d.weight.zero_()
        mixer.conv1d.weight[:, 0, -1] = 1
        mixer.conv1d.bias.zero_()
        mixer.D.zero_()
    mixer.use_conv_activation = False
    mixer.use_gated_norm = False
    x = torch.randn(2, t, hidden, dtype=torch.float64)
    out = mixer(x, position_ids=torch.arange(t).expand(2, t))

    q = (x @ wq.T).view(2, t, h, hd)
    k = (x @ wk.T).view(2, t, g, hd)
    v = (x @ wv.T).view(2, t, g, hd)
    heads = []
    for j in range(h):
        kv = j * g // h
        scores = torch.einsum("btd,bsd->bts", q[:, :, j], k[:, :, kv]).tril()
        heads.append(scores @ v[:, :, kv])
    expected = torch.cat(heads, dim=-1) @ wo.T
    assert rel(out, expected) < 1e-10
