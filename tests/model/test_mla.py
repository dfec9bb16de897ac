"""MLA against naive attention written from the definition (float64), and its cache/padding/packing paths."""

import math

import pytest
import torch

from zebra.model.cache import MLALayerCache
from zebra.model.configuration_zebra import ZebraConfig
from zebra.model.mla import MultiHeadLatentAttention
from zebra.model.packing import doc_ids_from_position_ids
from zebra.model.rope import base_inv_freq, yarn_inv_freq, yarn_mscale

VARIANTS = ["pairs", "reference"]
ROPE_KEYS = ["shared", "per_kv_head"]
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
B, T, H = 2, 12, 64


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_mla(variant, seed=0, rope_key="shared", **overrides):
    kw = dict(vocab_size=64, hidden_size=H, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8,
              rope_parameters=dict(ROPE), mla_rope=variant, rope_key=rope_key)
    cfg = ZebraConfig(**{**kw, **overrides})
    torch.manual_seed(seed)
    mla = MultiHeadLatentAttention(cfg, layer_idx=0).double()
    with torch.no_grad():  # larger weights than nn.Linear's default, so attention is far from uniform
        for p in mla.parameters():
            p.normal_(0, 0.4)
    return cfg, mla


def new_cache(cfg, b=B):
    return MLALayerCache(b, cfg.mla_cache_dim, torch.float64, "cpu")


def rotate_pairs(x, pos, inv_freq, pairs, scale):
    """Rotate each (i, j) in `pairs` of x [B, T, ..., d] by pos * inv_freq[p], then multiply by `scale`."""
    out = x.clone()
    a = pos.double()[..., None] * inv_freq  # [B, T, d/2]
    while a.dim() < x.dim():
        a = a.unsqueeze(-2)
    for p, (i, j) in enumerate(pairs):
        c, s = a[..., p].cos(), a[..., p].sin()
        out[..., i] = x[..., i] * c - x[..., j] * s
        out[..., j] = x[..., j] * c + x[..., i] * s
    return out * scale


def naive_mla(mla, cfg, x, pos, allowed):
    """Attention from the definition: per-head keys/values materialised, GQA by explicit repeat, explicit
    softmax. `allowed` [B, T, S] bool says which keys each query may see."""
    h, g, dn, dr, dv, r = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.qk_nope_head_dim,
                           cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank)
    b, t, _ = x.shape
    q = (x @ mla.q_a_proj.weight.T @ mla.q_b_proj.weight.T).view(b, t, h, dn + dr)
    ckv = x @ mla.kv_a_proj.weight.T
    c, kr = ckv[..., :r], ckv[..., r:]
    kv = (c @ mla.kv_b_proj.weight.T).view(b, t, g, dn + dv)
    group = [j * g // h for j in range(h)]  # GQA: query head j reads KV head floor(j*g/h)
    k_nope, v = kv[:, :, group, :dn], kv[:, :, group, dn:]

    if cfg.mla_rope == "pairs":  # pair (p, p + dr/2) at the base's frequency p, no mscale
        inv = base_inv_freq(cfg.rope_parameters, cfg.head_dim)[: dr // 2]
        pairs, m = [(p, p + dr // 2) for p in range(dr // 2)], 1.0
    else:  # adjacent pair (2p, 2p + 1) at YaRN frequency p, cos and sin times m
        f = cfg.rope_parameters["factor"]
        inv = yarn_inv_freq(dr, 500000.0, f, 8192)
        pairs, m = [(2 * p, 2 * p + 1) for p in range(dr // 2)], 0.1 * math.log(f) + 1
    q_rope = rotate_pairs(q[..., dn:], pos, inv, pairs, m)  # [B, T, h, dr]
    # shared: one rope key for every head; per_kv_head: query head j reads its KV head's slot
    slots = kr.view(b, t, -1, dr)
    slot_of_head = group if cfg.rope_key == "per_kv_head" else [0] * h
    k_rope = rotate_pairs(slots[:, :, slot_of_head], pos, inv, pairs, m)  # [B, T, h, dr]

    logits = torch.einsum("bthd,bshd->bhts", q[..., :dn], k_nope) + torch.einsum("bthd,bshd->bhts", q_rope, k_rope)
    logits = logits * (dn + dr) ** -0.5
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    p = (logits - logits.amax(-1, keepdim=True)).exp()
    p = p / p.sum(-1, keepdim=True)
    out = torch.einsum("bhts,bshd->bthd", p, v).reshape(b, t, h * dv)
    return out @ mla.o_proj.weight.T


def causal(b, t):
    return torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t)


@pytest.mark.parametrize("rope_key", ROPE_KEYS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_naive_attention(variant, rope_key):
    cfg, mla = make_mla(variant, rope_key=rope_key)
    x = torch.randn(B, T, H, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T) + torch.tensor([[0], [5000]])  # second row far out, into YaRN/llama3 bands
    ref = naive_mla(mla, cfg, x, pos, causal(B, T))
    assert rel(mla(x, pos), ref) < 1e-10
    assert rel(mla(x, pos, absorb=True), ref) < 1e-10  # absorbed prefill gives the same
    assert rel(mla(x, pos, cache=new_cache(cfg)), ref) < 1e-10  # prefill through a cache


@pytest.mark.parametrize("rope_key", ROPE_KEYS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_with_cache_matches_full_forward(variant, rope_key):
    cfg, mla = make_mla(variant, rope_key=rope_key)
    x = torch.randn(B, T, H, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    full = mla(x, pos)
    for absorb in (None, True, False):  # None = absorbed while decoding
        cache = new_cache(cfg)
        steps = [mla(x[:, i:i + 1], pos[:, i:i + 1], cache=cache, absorb=absorb) for i in range(T)]
        assert rel(torch.cat(steps, 1), full) < 1e-10
        n_keys = cfg.num_key_value_heads if rope_key == "per_kv_head" else 1
        assert cache.length == T and cache.latent.shape == (B, T, cfg.kv_lora_rank + n_keys * cfg.qk_rope_head_dim)
    # by default prefill materialises K/V (kv_b_proj runs) and decode does not (absorbed)
    calls = []
    mla.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))
    cache = new_cache(cfg)
    mla(x[:, :5], pos[:, :5], cache=cache)
    assert len(calls) == 1
    mla(x[:, 5:6], pos[:, 5:6], cache=cache)
    assert len(calls) == 1
    # prefill 5, then a chunk of 4 new tokens at once (causal among themselves), then single tokens
    for absorb in (None, False):
        cache = new_cache(cfg)
        outs = [mla(x[:, :5], pos[:, :5], cache=cache, absorb=absorb),
                mla(x[:, 5:9], pos[:, 5:9], cache=cache, absorb=absorb)]
        outs += [mla(x[:, i:i + 1], pos[:, i:i + 1], cache=cache, absorb=absorb) for i in range(9, T)]
        assert rel(torch.cat(outs, 1), full) < 1e-10


@pytest.mark.parametrize("rope_key", ROPE_KEYS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_row_equals_sequence_alone(variant, rope_key):
    cfg, mla = make_mla(variant, rope_key=rope_key)
    n_pad, t_prompt, t_new = 3, 7, 4
    seq = torch.randn(1, t_prompt + t_new, H, dtype=torch.float64)
    other = torch.randn(1, n_pad + t_prompt + t_new, H, dtype=torch.float64)
    alone = mla(seq, torch.arange(t_prompt + t_new)[None])

    # batch row 0: left-padded seq (pads carry garbage); row 1: a longer sequence without padding
    pads = 100 * torch.randn(1, n_pad, H, dtype=torch.float64)
    x = torch.cat([torch.cat([pads, seq], 1), other])
    mask = torch.ones(2, n_pad + t_prompt + t_new, dtype=torch.long)
    mask[0, :n_pad] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as HF generate does
    assert rel(mla(x, pos, attention_mask=mask)[0, n_pad:], alone[0]) < 1e-10

    # generate-style: prefill the prompt, then decode one token at a time with the growing mask
    p = n_pad + t_prompt
    for absorb in (None, False):
        cache = new_cache(cfg, 2)
        outs = [mla(x[:, :p], pos[:, :p], attention_mask=mask[:, :p], cache=cache, absorb=absorb)[:, n_pad:]]
        for i in range(p, p + t_new):
            outs.append(mla(x[:, i:i + 1], pos[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=cache,
                            absorb=absorb))
        assert rel(torch.cat(outs, 1)[0], alone[0]) < 1e-10


@pytest.mark.parametrize("rope_key", ROPE_KEYS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_row_equals_documents_alone(variant, rope_key):
    cfg, mla = make_mla(variant, rope_key=rope_key)
    lengths = [5, 4, 3]
    x = torch.randn(1, sum(lengths), H, dtype=torch.float64)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    doc_ids = doc_ids_from_position_ids(pos)
    packed = mla(x, pos, doc_ids=doc_ids)
    alone = torch.cat([mla(xd, torch.arange(n)[None]) for xd, n in zip(x.split(lengths, 1), lengths)], 1)
    assert rel(packed, alone) < 1e-10
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    assert rel(packed, naive_mla(mla, cfg, x, pos, causal(1, sum(lengths)) & same_doc)) < 1e-10
    # and with a padding tail (right padding, as in training batches)
    xp = torch.cat([x, torch.randn(1, 2, H, dtype=torch.float64)], 1)
    posp = torch.cat([pos, torch.tensor([[0, 1]])], 1)
    maskp = torch.cat([torch.ones(1, sum(lengths)), torch.zeros(1, 2)], 1)
    out = mla(xp, posp, doc_ids=doc_ids_from_position_ids(posp), attention_mask=maskp)
    assert rel(out[:, : sum(lengths)], alone) < 1e-10 and torch.isfinite(out).all()


def test_reference_rope_logits_scaled_by_m_squared_in_the_layer(monkeypatch):
    """Zero the nope keys: the layer's logits are then pure rope and must scale by m^2 with mscale."""
    cfg, mla = make_mla("reference")
    x = torch.randn(1, 6, H, dtype=torch.float64)
    pos = torch.arange(6)[None]
    captured = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        captured.append(q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        mla.kv_b_proj.weight.view(2, 8 + 16, 24)[:, :8] = 0  # k_nope = 0
    mla(x, pos)
    mla.rotary_emb.mscale = 1.0
    mla(x, pos)
    m2 = yarn_mscale(32.0) ** 2
    assert m2 == pytest.approx(1.813, abs=1e-3)
    assert rel(captured[0], m2 * captured[1]) < 1e-12


def test_backward_runs_and_params_named_as_interfaces():
    cfg, mla = make_mla("pairs")
    names = {n for n, _ in mla.named_parameters()}
    assert names == {f"{p}.weight" for p in ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj")}
    assert mla.kv_b_proj.weight.shape == (2 * (8 + 16), 24) and mla.kv_a_proj.weight.shape == (24 + 8, H)
    x = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    mla(x, torch.arange(T).expand(B, T)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mla.parameters())


@pytest.mark.parametrize("kernel", ["matmul", "sdpa", "triton"])
@pytest.mark.parametrize("rope_key", ROPE_KEYS)
def test_static_cache_decode_with_each_kernel_matches_naive(rope_key, kernel):
    """Prefill then single-token decode through a preallocated cache written at device slots (the CUDA-graph
    path), absorbed, with each decode kernel (triton: under the interpreter on CPU) against the definition."""
    cfg, mla = make_mla("pairs", rope_key=rope_key, num_key_value_heads=2, mla_decode_attention=kernel)
    x = torch.randn(B, T, H, dtype=torch.float64)
    pos = torch.arange(T).expand(B, T)
    ref = naive_mla(mla, cfg, x, pos, causal(B, T))
    cache = MLALayerCache(B, cfg.mla_cache_dim, torch.float64, "cpu", max_length=T + 3)
    p = 5
    outs = [mla(x[:, :p], pos[:, :p], cache=cache, cache_position=torch.arange(p), absorb=False)]
    for i in range(p, T):
        outs.append(mla(x[:, i:i + 1], pos[:, i:i + 1], cache=cache, cache_position=torch.tensor([i]), absorb=True))
    # the Triton kernel accumulates its scores in fp32 whatever the input dtype
    assert rel(torch.cat(outs, 1), ref) < (1e-6 if kernel == "triton" else 1e-10)


def test_per_kv_head_rope_key_shapes_and_config():
    cfg, mla = make_mla("pairs", rope_key="per_kv_head")
    assert cfg.mla_rope_key_heads == 2 and cfg.mla_cache_dim == 24 + 2 * 8
    assert mla.kv_a_proj.weight.shape == (24 + 2 * 8, H)
    assert ZebraConfig(**{**cfg.to_dict(), "rope_key": "shared"}).mla_cache_dim == 24 + 8
    with pytest.raises(ValueError, match="rope_key"):
        make_mla("pairs", rope_key="per_head")
