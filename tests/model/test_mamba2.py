"""Mamba2Mixer (float64, CPU): cache paths, pads, packing, METHOD §3's mapping identity, fp32 parameters."""

import math

import pytest
import torch
import torch.nn.functional as F

from zebra.model.cache import MambaLayerCache
from zebra.model.configuration_zebra import ZebraConfig
from zebra.model.mamba2 import Mamba2Mixer

DT = torch.float64
T = 50  # > 3 chunks of 16


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def small_config(**kw):
    base = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, hybrid_layer_types=["mamba"] * 2, mamba_chunk_size=16)
    base.update(kw)
    return ZebraConfig(**base)


def make_mixer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = small_config(**kw)
    m = Mamba2Mixer(cfg, layer_idx=0).to(DT)
    with torch.no_grad():  # move off the init so every part of the layer matters
        m.dt_bias.copy_(torch.randn(m.nheads) * 0.5)
        m.D.copy_(torch.randn(m.nheads))
        m.norm.weight.add_(0.1 * torch.randn(m.d_inner))
        m.conv1d.bias.copy_(0.1 * torch.randn(m.conv_dim))
    return m


def make_cache(m, b):
    c = MambaLayerCache(b, m.conv_dim, m.d_conv, m.nheads, m.headdim, m.d_state, DT, "cpu")
    c.ssm_state = c.ssm_state.to(DT)  # the state in the test's precision (the cache keeps fp32 by default)
    return c


def hidden(b=2, t=T, seed=1):
    return torch.randn(b, t, 64, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_parameter_names_and_shapes():
    m = make_mixer()
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"in_proj.weight": (2 * 64 + 2 * 32 + 4, 64), "conv1d.weight": (32 + 32 + 64, 1, 4),
                      "conv1d.bias": (128,), "dt_bias": (4,), "A_log": (4,), "D": (4,), "norm.weight": (64,),
                      "out_proj.weight": (64, 64)}


def test_init():
    torch.manual_seed(0)
    cfg = small_config(num_attention_heads=8, head_dim=8, num_key_value_heads=2)
    m = Mamba2Mixer(cfg)
    dt = F.softplus(m.dt_bias)
    assert (dt >= cfg.mamba_dt_init_floor * 0.999).all() and (dt <= cfg.mamba_dt_max * 1.001).all()
    A = torch.exp(m.A_log)
    assert (A >= 1 - 1e-6).all() and (A <= 16 + 1e-5).all()
    assert torch.equal(m.D, torch.ones(8)) and torch.equal(m.norm.weight, torch.ones(64))
    for name in ("A_log", "D", "dt_bias"):
        assert getattr(m, name).dtype == torch.float32 and getattr(m, name)._no_weight_decay


def test_fp32_parameters_survive_casts():
    m = make_mixer().float()
    opt_ref = m.A_log
    m.A_log.grad = torch.ones(4)
    m.to(torch.bfloat16)
    assert m.in_proj.weight.dtype == torch.bfloat16 and m.norm.weight.dtype == torch.bfloat16
    for name in ("A_log", "D", "dt_bias"):
        p = getattr(m, name)
        assert p.dtype == torch.float32 and p._no_weight_decay
    assert m.A_log is opt_ref and m.A_log.grad.dtype == torch.float32  # same Parameter object (optimizers)
    m.half()
    assert m.D.dtype == torch.float32
    m.double()
    assert m.D.dtype == torch.float64  # upcasts are allowed (the float64 tests rely on it)
    # and the bf16 module runs
    out = m.to(torch.bfloat16)(hidden(t=20).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_decode_token_by_token_equals_full_forward():
    m = make_mixer()
    h = hidden()
    full = m(h)
    cache = make_cache(m, 2)
    outs = [m(h[:, t:t + 1], cache=cache) for t in range(T)]
    assert rel(torch.cat(outs, 1), full) < 1e-10
    assert cache.length == T


@pytest.mark.parametrize("cut", [2, 23])
def test_prefill_then_continued_prefill_and_decode(cut):
    m = make_mixer()
    h = hidden()
    full = m(h)
    cache = make_cache(m, 2)
    a = m(h[:, :cut], cache=cache)
    b = m(h[:, cut:40], cache=cache)
    c = [m(h[:, t:t + 1], cache=cache) for t in range(40, T)]
    assert rel(torch.cat([a, b, *c], 1), full) < 1e-10


def test_left_padded_row_equals_sequence_alone():
    m = make_mixer()
    h = hidden()
    pads = 7
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, :pads] = 0
    h_padded = h.clone()
    h_padded[0, :pads] = 100.0  # whatever sits at the pads must not matter
    cache = make_cache(m, 2)
    out = m(h_padded[:, :40], attention_mask=mask[:, :40], cache=cache)
    steps = [m(h_padded[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(40, T)]
    out = torch.cat([out, *steps], 1)
    alone = m(h[:1, pads:])
    assert rel(out[:1, pads:], alone) < 1e-10
    assert rel(out[1:], m(h[1:])) < 1e-10


def test_packed_documents_equal_documents_alone():
    m = make_mixer()
    lengths = [13, 20, 17]  # boundaries at 13 and 33: inside chunks of 16
    h = hidden(b=1)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed = m(h, doc_ids=doc_ids)
    start = 0
    for n in lengths:
        assert rel(packed[:, start:start + n], m(h[:, start:start + n])) < 1e-10
        start += n


def test_packed_prefill_cache_holds_only_the_last_document():
    m = make_mixer()
    lengths = [30, 2]  # the last document is shorter than the conv window
    h = hidden(b=1, t=40)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    cache = make_cache(m, 1)
    m(h[:, :32], doc_ids=doc_ids, cache=cache)
    steps = torch.cat([m(h[:, t:t + 1], cache=cache) for t in range(32, 40)], 1)
    assert rel(steps, m(h[:, 30:40])[:, 2:]) < 1e-10


def gqa_heads(t, n_groups, n_heads):
    """[B, T, g*d] -> [B, T, h, d] with head j reading group j // (h/g) (repeat_kv)."""
    b, s, _ = t.shape
    return t.view(b, s, n_groups, -1).repeat_interleave(n_heads // n_groups, dim=2)


@pytest.mark.parametrize("silu", [False, True])
def test_mapping_identity_linear_attention(silu):
    """METHOD §3: A = 0, dt = 1, identity conv, D = 0, no gate/norm: causal linear attention on in_proj's
    C/B/x rows as q/k/v, GQA head mapping, then W_o (over SiLU(q), SiLU(k), SiLU(v) with the SiLU kept)."""
    m = make_mixer()
    h_, g, hd = 4, 2, 16
    with torch.no_grad():
        m.A_log.fill_(-math.inf)  # A = -exp(-inf) = 0: no decay
        m.in_proj.weight[-h_:].zero_()  # dt rows
        m.dt_bias.fill_(math.log(math.e - 1))  # softplus(0 + ln(e - 1)) = 1
        m.conv1d.weight.zero_()
        m.conv1d.weight[:, 0, -1] = 1.0  # kernel [0, 0, 0, 1]
        m.conv1d.bias.zero_()
        m.D.zero_()
    m.use_conv_activation = silu
    m.use_gated_norm = False
    h = hidden()
    W = m.in_proj.weight
    d_inner, d_xb = h_ * hd, g * hd
    W_v, W_k, W_q = W[d_inner:d_inner + d_xb], W[d_inner + d_xb:d_inner + 2 * d_xb], W[d_inner + 2 * d_xb:-h_]
    act = F.silu if silu else (lambda t: t)
    q = act(h @ W_q.T).view(2, T, h_, hd)
    k = gqa_heads(act(h @ W_k.T), g, h_)
    v = gqa_heads(act(h @ W_v.T), g, h_)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    o = torch.einsum("bhts,bshd->bthd", scores, v).reshape(2, T, d_inner)
    ref = o @ m.out_proj.weight.T
    assert rel(m(h), ref) < 1e-12


def test_gradients_flow_to_every_parameter():
    m = make_mixer()
    h = hidden().requires_grad_()
    doc_ids = torch.cat([torch.zeros(20), torch.ones(30)]).long()[None].expand(2, T)
    m(h, doc_ids=doc_ids).pow(2).sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pads_leave_the_ssm_state_untouched():
    """Pads after real tokens (a right-padded row, a finished row in a batch) neither write nor decay the state."""
    m = make_mixer()
    h = hidden()
    cache = make_cache(m, 2)
    m(h[:, :30], cache=cache)
    before = cache.ssm_state.clone()
    mask = torch.cat([torch.ones(2, 30), torch.zeros(2, 20)], 1).long()
    m(h[:, 30:45], attention_mask=mask[:, :45], cache=cache)  # a chunk of pads
    m(h[:, 45:46], attention_mask=mask[:, :46], cache=cache)  # a decode step on a pad
    assert torch.equal(cache.ssm_state, before)
