"""Import of released Zebra-Llama checkpoints, tested offline on a synthetic checkpoint written in their layout.

The reference forward below is written from METHOD §2 and the reference layout (zebra.compose.reference_import's
docstring): MLA with YaRN on the rope dims, adjacent dims (2j, 2j+1) rotated together, cos/sin scaled by
0.1 ln(factor) + 1; Mamba2 as its sequential recurrence. It shares no code with zebra.model.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from zebra.compose.reference_import import (ReferenceImportError, convert_state_dict, import_reference,
                                            load_reference, read_state_dict, reference_to_zebra_key,
                                            reference_zebra_config, zebra_to_reference_key)

H, NH, G, HD, L, V = 32, 4, 2, 16, 4, 61
R_Q, R_KV, D_ROPE, D_NOPE, D_V = 16, 12, 8, 8, 8
MLA_LAYERS = [0, 2]
FACTOR, ORIGINAL, THETA = 4.0, 64, 100.0  # a YaRN ramp over pairs 0..3 of the 4
EPS = 1e-5


def write_reference_checkpoint(path, tied=False, seed=0, hybrid_overrides=None, extra=None):
    """A tiny checkpoint in the released layout: config.json (base Llama), hybrid_config.json, model.safetensors."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

    sd = {"model.embed_tokens.weight": w(V, H, scale=1.0), "model.norm.weight": 1 + w(H, scale=0.1)}
    if not tied:
        sd["lm_head.weight"] = w(V, H)
    d_inner, d_xb = NH * HD, G * HD
    for i in range(L):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + w(H, scale=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + w(H, scale=0.1)
        sd[p + "mlp.gate_proj.weight"] = w(2 * H, H)
        sd[p + "mlp.up_proj.weight"] = w(2 * H, H)
        sd[p + "mlp.down_proj.weight"] = w(H, 2 * H)
        if i in MLA_LAYERS:
            sd[p + "mla.q_a_proj.weight"] = w(R_Q, H)
            sd[p + "mla.q_b_proj.weight"] = w(NH * (D_NOPE + D_ROPE), R_Q, scale=0.5)
            sd[p + "mla.kv_a_proj_with_mqa.weight"] = w(R_KV + D_ROPE, H)
            sd[p + "mla.kv_b_proj.weight"] = w(G * (D_NOPE + D_V), R_KV, scale=0.5)
            sd[p + "mla.out_proj.weight"] = w(H, NH * D_V)
        else:
            conv_dim = d_inner + 2 * d_xb
            sd[p + "mamba.in_proj.weight"] = w(2 * d_inner + 2 * d_xb + NH, H)
            sd[p + "mamba.conv1d.weight"] = w(conv_dim, 1, 4)
            sd[p + "mamba.conv1d.bias"] = w(conv_dim, scale=0.1)
            sd[p + "mamba.dt_bias"] = w(NH, scale=0.5)
            sd[p + "mamba.A_log"] = torch.log(torch.rand(NH, generator=g, dtype=torch.float64) * 3 + 0.5)
            sd[p + "mamba.D"] = 1 + w(NH, scale=0.2)
            sd[p + "mamba.norm.weight"] = 1 + w(d_inner, scale=0.1)
            sd[p + "mamba.out_proj.weight"] = w(H, d_inner)
    sd.update(extra or {})
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "_name_or_path": "tiny/base",
            "vocab_size": V, "hidden_size": H, "intermediate_size": 2 * H, "num_hidden_layers": L,
            "num_attention_heads": NH, "num_key_value_heads": G, "head_dim": HD, "hidden_act": "silu",
            "rms_norm_eps": EPS, "max_position_embeddings": 128, "tie_word_embeddings": tied, "rope_theta": THETA,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}, "bos_token_id": 1, "eos_token_id": 2}
    hybrid = {"hidden_size": H, "intermediate_size": 2 * H, "hidden_act": "silu", "n_layer": L,
              "mla_layers": MLA_LAYERS, "rms_norm_eps": EPS, "num_attention_heads": NH, "num_key_value_heads": G,
              "kv_lora_rank": R_KV, "q_lora_rank": R_Q, "use_lora_layer_norm": False,
              "use_fixed_rank_for_first_and_last_block": False, "use_full_kv_head": False, "layer_rank_list": {},
              "qk_rope_head_dim": D_ROPE, "v_head_dim": D_V, "qk_nope_head_dim": D_NOPE, "q_energy_ratio": None,
              "kv_energy_ratio": None, "qkv_rank_divisor": 8, "max_position_embeddings": 128, "rope_theta": THETA,
              "rope_scaling": {"factor": FACTOR, "original_max_position_embeddings": ORIGINAL, "rope_type": "yarn"},
              "attention_bias": False, "attention_dropout": 0.0, "rope_type": "yarn", "d_model": H,
              "ssm_cfg": {"expand": 1, "ngroups": NH, "d_state": HD, "repeat_kv_before_conv": False},
              "d_inner": d_inner, "d_xb": d_xb, **(hybrid_overrides or {})}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(base))
    (path / "hybrid_config.json").write_text(json.dumps(hybrid))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return sd, base, hybrid


# ------------------------------------------------------------------------------------------------ reference forward
def rms(x, w, eps=EPS):
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def yarn_inv_freq_ref(dim, theta, factor, original):
    """YaRN from its definition: pairs that rotate more than beta_fast=32 times within the original length keep
    their frequency, those rotating less than beta_slow=1 times are divided by the factor, linear in between."""
    freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def pair_for(rotations):  # the (fractional) pair index j with original / wavelength_j = rotations
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(pair_for(32)), 0), min(math.ceil(pair_for(1)), dim - 1)
    if low == high:
        high += 0.001
    blend = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # 0 keep, 1 divide
    return freq * (1 - blend) + freq / factor * blend


def rotate_pairs(x, pos, inv_freq, m):
    """Rotate adjacent dims (2j, 2j+1) of x [..., T, d] by pos * inv_freq[j], scaled by m."""
    ang = pos[:, None].double() * inv_freq[None]  # [T, d/2]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = (a * ang.cos() - b * ang.sin()) * m
    out[..., 1::2] = (a * ang.sin() + b * ang.cos()) * m
    return out


def ref_mla(x, sd, p):
    T = x.shape[0]
    q = (x @ sd[p + "q_a_proj.weight"].T @ sd[p + "q_b_proj.weight"].T).view(T, NH, D_NOPE + D_ROPE)
    ckv = x @ sd[p + "kv_a_proj_with_mqa.weight"].T
    c, k_pe = ckv[:, :R_KV], ckv[:, R_KV:]
    kv = (c @ sd[p + "kv_b_proj.weight"].T).view(T, G, D_NOPE + D_V)
    inv = yarn_inv_freq_ref(D_ROPE, THETA, FACTOR, ORIGINAL)
    m = 0.1 * math.log(FACTOR) + 1
    pos = torch.arange(T)
    out = []
    for head in range(NH):
        kvh = kv[:, head // (NH // G)]
        q_pe = rotate_pairs(q[:, head, D_NOPE:], pos, inv, m)
        kp = rotate_pairs(k_pe, pos, inv, m)
        s = (q[:, head, :D_NOPE] @ kvh[:, :D_NOPE].T + q_pe @ kp.T) / math.sqrt(D_NOPE + D_ROPE)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.softmax(s, -1) @ kvh[:, D_NOPE:])
    return torch.cat(out, -1) @ sd[p + "out_proj.weight"].T


def ref_mamba(x, sd, p):
    T = x.shape[0]
    d_inner, d_xb = NH * HD, G * HD
    z, xbc, dt = (x @ sd[p + "in_proj.weight"].T).split([d_inner, 2 * d_xb + d_inner, NH], -1)
    w, b = sd[p + "conv1d.weight"][:, 0], sd[p + "conv1d.bias"]  # [C, 4]
    padded = torch.cat([torch.zeros(3, xbc.shape[1], dtype=x.dtype), xbc])
    xbc = F.silu(torch.stack([(padded[t:t + 4].T * w).sum(-1) + b for t in range(T)]))
    xs, B, C = xbc.split([d_xb, d_xb, d_inner], -1)
    dt = F.softplus(dt + sd[p + "dt_bias"])
    A = -torch.exp(sd[p + "A_log"])
    state = torch.zeros(NH, HD, HD, dtype=x.dtype)
    ys = []
    for t in range(T):
        y = []
        for head in range(NH):
            grp = head // (NH // G)
            xv, bv = xs[t, grp * HD:(grp + 1) * HD], B[t, grp * HD:(grp + 1) * HD]
            state[head] = torch.exp(dt[t, head] * A[head]) * state[head] + dt[t, head] * torch.outer(xv, bv)
            y.append(state[head] @ C[t, head * HD:(head + 1) * HD] + sd[p + "D"][head] * xv)
        ys.append(torch.cat(y))
    y = torch.stack(ys) * F.silu(z)
    y = y.view(T, NH, HD)
    y = (y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(T, d_inner) * sd[p + "norm.weight"]
    return y @ sd[p + "out_proj.weight"].T


def ref_logits(sd, ids, tied=False):
    h = sd["model.embed_tokens.weight"][ids]
    for i in range(L):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        h = h + (ref_mla(x, sd, p + "mla.") if i in MLA_LAYERS else ref_mamba(x, sd, p + "mamba."))
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        h = h + (F.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)) \
            @ sd[p + "mlp.down_proj.weight"].T
    h = rms(h, sd["model.norm.weight"])
    return h @ (sd["model.embed_tokens.weight"] if tied else sd["lm_head.weight"]).T


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("tied", [False, True])
def test_imported_model_reproduces_reference_forward(tmp_path, tied):
    sd, _, _ = write_reference_checkpoint(tmp_path / "ckpt", tied=tied)
    model, tokenizer, info = load_reference(tmp_path / "ckpt", dtype=torch.float64)
    assert tokenizer is None and info["mla_layers"] == MLA_LAYERS
    assert model.config.mla_rope == "reference" and model.config.hybrid_layer_types == ["mla", "mamba", "mla", "mamba"]
    assert (model.config.q_lora_rank, model.config.kv_lora_rank) == (R_Q, R_KV)
    ids = torch.randint(0, V, (21,), generator=torch.Generator().manual_seed(1))  # longer than the conv and > 16
    with torch.no_grad():
        got = model(ids[None]).logits[0]
    want = ref_logits(sd, ids, tied)
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9), (got - want).abs().max()
    # decode with the hybrid cache continues the same computation
    with torch.no_grad():
        gen = model.generate(ids[None, :6], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 10)
    assert int(gen[0, 6]) == int(ref_logits(sd, ids[:6], tied)[-1].argmax())


def test_parameter_mapping_is_a_bijection(tmp_path):
    sd, base, hybrid = write_reference_checkpoint(tmp_path / "ckpt")
    config = reference_zebra_config(base, hybrid, sd)
    mapped = {reference_to_zebra_key(k): k for k in sd}
    assert len(mapped) == len(sd)  # injective
    from zebra.model import ZebraForCausalLM

    ours = set(ZebraForCausalLM(config).state_dict())
    assert set(mapped) == ours  # onto our parameters, nothing left over
    for new, old in mapped.items():  # and the inverse undoes it
        assert zebra_to_reference_key(new, config.hybrid_layer_types) == old
    assert set(convert_state_dict(sd, config)) == ours


def test_import_exports_a_loadable_zebra_model(tmp_path):
    import zebra  # noqa: F401
    from transformers import AutoModelForCausalLM

    sd, _, _ = write_reference_checkpoint(tmp_path / "ckpt")
    out = import_reference(tmp_path / "ckpt", tmp_path / "zebra", dtype=torch.float64)
    assert (out / "modeling_zebra.py").is_file() and "Zebra-Llama" in (out / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    ids = torch.arange(3, 15)
    with torch.no_grad():
        got = loaded(ids[None]).logits[0]
    # from_pretrained keeps A_log, D and dt_bias in fp32 (their float64 values rounded), hence not 1e-9 here
    assert torch.allclose(got, ref_logits(sd, ids), atol=1e-5, rtol=1e-5)
    assert set(read_state_dict(tmp_path / "ckpt")) == set(sd)


def test_unsupported_reference_features_fail_clearly(tmp_path):
    write_reference_checkpoint(tmp_path / "ln", hybrid_overrides={"use_lora_layer_norm": True})
    with pytest.raises(ReferenceImportError, match="use_lora_layer_norm"):
        load_reference(tmp_path / "ln")
    write_reference_checkpoint(tmp_path / "extra", extra={"model.layers.0.mla.kv_a_layernorm.weight": torch.ones(R_KV)})
    with pytest.raises(ReferenceImportError, match="kv_a_layernorm"):
        load_reference(tmp_path / "extra")
    write_reference_checkpoint(tmp_path / "kinds", hybrid_overrides={"mla_layers": [0, 1]})
    with pytest.raises(ReferenceImportError, match="mla_layers|MLA weights"):
        load_reference(tmp_path / "kinds")
    write_reference_checkpoint(tmp_path / "mscale", hybrid_overrides={
        "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32, "rope_type": "yarn",
                         "mscale_all_dim": 1.0}})
    with pytest.raises(ReferenceImportError, match="mscale_all_dim"):
        load_reference(tmp_path / "mscale")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReferenceImportError, match="hybrid_config.json|config.json"):
        load_reference(tmp_path / "empty")
