"""RoPE: base Llama frequencies, YaRN for the reference MLA rope, and the two MLA rope layouts."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from zebra.model.configuration_zebra import ZebraConfig
from zebra.model.rope import (
    MLARotaryEmbedding,
    base_inv_freq,
    mla_rope_dims,
    yarn_correction_range,
    yarn_inv_freq,
    yarn_mscale,
)

LLAMA32_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def small_config(**kw):
    args = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, q_lora_rank=32, kv_lora_rank=24, qk_rope_head_dim=8,
                rope_parameters=dict(LLAMA32_ROPE))
    args.update(kw)
    return ZebraConfig(**args)


# ---- base frequencies against transformers (test oracle) ----

@pytest.mark.parametrize("rope", [LLAMA32_ROPE, {"rope_type": "llama3", **{**LLAMA32_ROPE, "factor": 8.0}},
                                  {"rope_type": "default", "rope_theta": 100000.0}])
def test_base_inv_freq_matches_transformers(rope):
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      max_position_embeddings=131072, rope_parameters=dict(rope))
    ours = base_inv_freq(rope, 64)
    if rope["rope_type"] == "default":
        theirs = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)[0].double()
    else:
        theirs = ROPE_INIT_FUNCTIONS["llama3"](cfg)[0].double()
    assert ours.dtype == torch.float64 and ours.shape == (32,)
    assert rel(ours, theirs) < 1e-6
    # and the cos/sin the base model applies (float32 there, so a float32-level tolerance)
    pos = torch.arange(48)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos)
    angles = pos[0, :, None].double() * ours
    angles = torch.cat([angles, angles], -1)
    assert rel(angles.cos(), cos[0].double()) < 1e-5 and rel(angles.sin(), sin[0].double()) < 1e-5


def test_llama3_scaling_bands():
    inv = base_inv_freq(LLAMA32_ROPE, 64)
    plain = base_inv_freq({"rope_type": "default", "rope_theta": 500000.0}, 64)
    wavelen = 2 * math.pi / plain
    assert torch.equal(inv[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])  # high frequencies kept
    assert torch.allclose(inv[wavelen > 8192], plain[wavelen > 8192] / 32, rtol=1e-15, atol=0)  # low ones divided
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert mid.any() and ((inv[mid] < plain[mid]) & (inv[mid] > plain[mid] / 32)).all()


# ---- YaRN ----

def test_yarn_correction_range_and_direction():
    # d_rope 32, theta 5e5, original 8192: correction dims 4.52 (beta_fast 32) and 8.75 (beta_slow 1)
    assert yarn_correction_range(32, 500000.0, 8192, 32, 1) == (4, 9)
    inv = yarn_inv_freq(32, 500000.0, 32.0, 8192)
    extra = 500000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    assert torch.equal(inv[:5], extra[:5])  # high-frequency pairs keep their frequency
    assert torch.allclose(inv[9:], extra[9:] / 32, rtol=1e-15, atol=0)  # low-frequency pairs are interpolated
    assert torch.allclose(inv[6], 0.4 * extra[6] / 32 + 0.6 * extra[6], rtol=1e-15, atol=0)  # ramp (6-4)/(9-4) = 0.4
    assert torch.equal(yarn_inv_freq(32, 1e5, 1.0, 8192), 1e5 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32))


@pytest.mark.parametrize("d_rope,factor", [(32, 32.0), (64, 8.0), (8, 32.0)])
def test_yarn_matches_transformers(d_rope, factor):
    cfg = LlamaConfig(hidden_size=d_rope * 4, num_attention_heads=4, head_dim=d_rope, max_position_embeddings=131072,
                      rope_parameters={"rope_type": "yarn", "rope_theta": 500000.0, "factor": factor,
                                       "original_max_position_embeddings": 8192, "beta_fast": 32.0,
                                       "beta_slow": 1.0})
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    assert rel(yarn_inv_freq(d_rope, 500000.0, factor, 8192), theirs.double()) < 1e-6
    assert abs(yarn_mscale(factor) - attention_factor) < 1e-12


# ---- which base dims are rope / nope ----

def test_mla_rope_dims():
    assert mla_rope_dims("reference", 16, 8) == (list(range(8)), list(range(8, 16)))
    nope, rope = mla_rope_dims("pairs", 16, 8)
    assert rope == [0, 1, 2, 3, 8, 9, 10, 11] and nope == [4, 5, 6, 7, 12, 13, 14, 15]
    nope, rope = mla_rope_dims("pairs", 64, 16)
    assert rope == list(range(8)) + list(range(32, 40)) and sorted(nope + rope) == list(range(64))
    assert nope == sorted(nope)
    with pytest.raises(ValueError):
        mla_rope_dims("yarn", 16, 8)


# ---- the MLA rotations ----

def base_rotate(x, pos, inv_freq):
    """Llama's rotation from its definition: dim i and i + hd/2 rotate by pos * inv_freq[i]."""
    half = x.shape[-1] // 2
    a = pos[:, None].double() * inv_freq
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin()], -1)


def test_pairs_rope_logits_equal_base_logits_on_selected_dims():
    torch.manual_seed(0)
    hd, d_rope, t = 64, 16, 40
    cfg = small_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=hd,
                       qk_rope_head_dim=d_rope, q_lora_rank=128, kv_lora_rank=128, mla_rope="pairs")
    rot = MLARotaryEmbedding(cfg)
    pos = torch.arange(t) * 97 + 3  # spread over the scaled and unscaled bands
    q, k = torch.randn(t, hd, dtype=torch.float64), torch.randn(t, hd, dtype=torch.float64)
    inv = base_inv_freq(cfg.rope_parameters, hd)
    qb, kb = base_rotate(q, pos, inv), base_rotate(k, pos, inv)
    _, rope = mla_rope_dims("pairs", hd, d_rope)
    base_logits = qb[:, rope] @ kb[:, rope].T  # the base's logits restricted to the chosen pairs

    cos, sin = rot(pos[None], torch.float64)
    mla_logits = rot.rotate(q[:, rope], cos[0], sin[0]) @ rot.rotate(k[:, rope], cos[0], sin[0]).T
    assert rel(mla_logits, base_logits) < 1e-12


def test_reference_rope_rotates_adjacent_pairs_with_mscale():
    torch.manual_seed(0)
    cfg = small_config(mla_rope="reference")
    rot = MLARotaryEmbedding(cfg)
    m = 0.1 * math.log(32) + 1
    assert rot.mscale == pytest.approx(m, abs=1e-15)
    pos = torch.arange(30) * 53
    q, k = torch.randn(30, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    cos, sin = rot(pos[None], torch.float64)
    got = rot.rotate(q, cos[0], sin[0]) @ rot.rotate(k, cos[0], sin[0]).T

    def adjacent(x):  # (x_2j, x_2j+1) rotated by pos * yarn_inv_freq[j], times m
        a = pos[:, None].double() * yarn_inv_freq(8, 500000.0, 32.0, 8192)
        e, o = x[:, 0::2], x[:, 1::2]
        return m * torch.stack([e * a.cos() - o * a.sin(), o * a.cos() + e * a.sin()], -1).flatten(-2)

    assert rel(got, adjacent(q) @ adjacent(k).T) < 1e-12


def test_reference_mscale_scales_rope_logits_by_m_squared():
    torch.manual_seed(0)
    rot = MLARotaryEmbedding(small_config(mla_rope="reference"))
    pos = torch.arange(25)[None] + 7
    q, k = torch.randn(25, 8, dtype=torch.float64), torch.randn(25, 8, dtype=torch.float64)

    def logits():
        cos, sin = rot(pos, torch.float64)
        return rot.rotate(q, cos[0], sin[0]) @ rot.rotate(k, cos[0], sin[0]).T

    scaled = logits()
    rot.mscale = 1.0
    plain = logits()
    m2 = (0.1 * math.log(32) + 1) ** 2
    assert m2 == pytest.approx(1.813, abs=1e-3)
    assert rel(scaled, m2 * plain) < 1e-12
    # no scaling in the base -> factor 1, mscale 1
    assert MLARotaryEmbedding(small_config(mla_rope="reference",
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e5})).mscale == 1.0
    assert MLARotaryEmbedding(small_config(mla_rope="pairs")).mscale == 1.0


def test_inv_freq_survives_dtype_casts_and_meta_init():
    rot = MLARotaryEmbedding(small_config(mla_rope="reference"))
    ref = rot.inv_freq.clone()
    rot.to(torch.bfloat16)
    assert rot.inv_freq.dtype == torch.float64 and torch.equal(rot.inv_freq, ref)
    assert "inv_freq" not in rot.state_dict()
    rot.inv_freq.zero_()  # as if materialised from the meta device with garbage
    rot.reset_inv_freq()
    assert torch.equal(rot.inv_freq, ref)
