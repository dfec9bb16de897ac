"""Import the released Zebra-Llama checkpoints (AMD's 1B/3B/8B SFT and DPO hybrids) as zebra models.

    python -m zebra.compose.reference_import amd/Zebra-Llama-1B-4MLA-12Mamba-DPO artifacts/reference/1b-4mla-dpo
    python -m zebra.compose.reference_import /path/to/downloaded/checkpoint out_dir --dtype bfloat16

Released checkpoints (Hugging Face hub, collection "amd-hybrid-models"): `amd/Zebra-Llama-{1B-4MLA-12Mamba,
1B-8MLA-8Mamba, 3B-6MLA-22Mamba, 3B-14MLA-14Mamba, 8B-8MLA-24Mamba, 8B-16MLA-16Mamba}-{SFT,DPO}`.

What the reference layout is (read from the public reference code, AMD-AGI/AMD-Hybrid-Models, directory
Zebra-Llama/: hybrid/hybrid_config.py, hybrid/hybrid_wrapper.py, hybrid/mla/hybrid_model.py and
hybrid_mla_layer.py, hybrid/mamba2/hybrid_model.py and hybrid_mamba2_layer.py, train_hybrid/train_distill.py):

- `config.json`: the base model's LlamaConfig (vocab, hidden, layers, heads, `rope_theta`, `rope_scaling`
  {rope_type llama3, factor, low/high_freq_factor, original_max_position_embeddings}, tie_word_embeddings, ...).
- `hybrid_config.json`: the `HybridConfig` dataclass: hidden_size, intermediate_size, hidden_act, n_layer,
  mla_layers (the MLA layer indices; every other layer is Mamba2), rms_norm_eps; MLA: num_attention_heads,
  num_key_value_heads, q_lora_rank, kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim,
  use_lora_layer_norm, use_full_kv_head, layer_rank_list (per-layer {"q_rank", "kv_rank"} overrides, keyed by the
  layer index as a string), q/kv_energy_ratio, qkv_rank_divisor, use_fixed_rank_for_first_and_last_block,
  max_position_embeddings, rope_theta, rope_scaling {"rope_type": "yarn", "factor", "original_max_position_
  embeddings"[, beta_fast, beta_slow, mscale, mscale_all_dim]}, attention_bias, attention_dropout, rope_type;
  Mamba2: d_model, d_inner (= h * head_dim), d_xb (= g * head_dim), ssm_cfg {"expand": 1, "ngroups": h,
  "d_state": head_dim, "repeat_kv_before_conv": false[, d_conv, chunk_size, ...]}.
- weights (`model.safetensors`, sharded safetensors with an index, or `pytorch_model.bin`): the state dict of a
  LlamaForCausalLM whose decoder layers were replaced, so the top level keeps Llama's names
  (`model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` unless tied) and each layer i has
  `model.layers.i.{input_layernorm,post_attention_layernorm}.weight`, `model.layers.i.mlp.{gate,up,down}_proj.weight`
  and either an MLA mixer `model.layers.i.mla.*`:
      q_a_proj.weight [r_q, H], q_b_proj.weight [h*(d_nope+d_rope), r_q] (per head [nope; rope] rows),
      kv_a_proj_with_mqa.weight [r_kv + d_rope, H] (latent, then the shared rope key),
      kv_b_proj.weight [g*(d_nope+d_v), r_kv] (per KV head [k_nope; v] rows), out_proj.weight [H, h*d_v]
      (q_a_layernorm / kv_a_layernorm with use_lora_layer_norm, q_proj without a q rank, biases with
      attention_bias: none of them in the released configs, and not supported here)
  or a Mamba2 mixer `model.layers.i.mamba.*`:
      in_proj.weight [2*d_inner + 2*d_xb + nheads, H] (rows [z, x, B, C, dt]), conv1d.weight [conv_dim, 1, d_conv],
      conv1d.bias [conv_dim] (channels [x, B, C], conv_dim = d_inner + 2*d_xb), dt_bias, A_log, D [nheads],
      norm.weight [d_inner], out_proj.weight [H, d_inner].

How their computation maps onto ours (METHOD §2): MLA repeats the g KV heads to h (repeat_kv), softmax scale
(d_nope+d_rope)^-0.5, YaRN on the d_rope dims (theta = rope_theta, the given factor and original length, beta_fast
32, beta_slow 1) with the rope rows permuted interleaved-to-half before rotate_half and cos/sin both multiplied by
0.1 ln(factor) + 1 (mscale 1, mscale_all_dim 0): that is our `mla_rope="reference"`. Mamba2: nheads = ngroups = h,
headdim = d_state = head_dim, x and B at width d_xb through the conv (SiLU) and then repeated to h heads, dt =
softplus(dt + dt_bias), one D per head, gated RMSNorm with norm_before_gate=False over groups of head_dim, eps 1e-5:
our attention-shaped Mamba2Mixer. Layer norms are plain RMSNorms with the config's eps in both layer kinds.

Parameter names map one to one (`reference_to_zebra_key`, inverse `zebra_to_reference_key`): `mla.` and `mamba.`
become `mixer.`, `kv_a_proj_with_mqa` becomes `kv_a_proj`, the MLA `out_proj` becomes `o_proj`; everything else
keeps its name. Anything the mapping does not know (a latent norm, a bias, a key of the wrong layer kind) is an
error, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

HYBRID_CONFIG = "hybrid_config.json"
RELEASED = [f"amd/Zebra-Llama-{v}-{s}" for v in ("1B-4MLA-12Mamba", "1B-8MLA-8Mamba", "3B-6MLA-22Mamba",
                                                 "3B-14MLA-14Mamba", "8B-8MLA-24Mamba", "8B-16MLA-16Mamba")
            for s in ("SFT", "DPO")]
# YaRN knobs our reference RoPE implements (zebra.model.rope): anything else cannot be reproduced
SUPPORTED_YARN = {"beta_fast": 32, "beta_slow": 1, "mscale": 1, "mscale_all_dim": 0}
# ssm_cfg keys -> the value our Mamba2Mixer implements (None: any value, mapped to a ZebraConfig field)
SUPPORTED_SSM = {"expand": 1, "repeat_kv_before_conv": False, "D_has_hdim": False, "rmsnorm": True,
                 "norm_before_gate": False, "bias": False, "ngroups": None, "d_state": None, "d_conv": None,
                 "chunk_size": None, "headdim": None, "dt_min": None, "dt_max": None, "dt_init_floor": None,
                 "A_init_range": None, "conv_bias": None, "dt_limit": None, "d_ssm": None, "conv_init": None,
                 "use_mem_eff_path": None}

_MLA_RENAME = {"q_a_proj": "q_a_proj", "q_b_proj": "q_b_proj", "kv_a_proj_with_mqa": "kv_a_proj",
               "kv_b_proj": "kv_b_proj", "out_proj": "o_proj"}
_MAMBA_PARAMS = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                 "out_proj.weight")
_SHARED = ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
           "mlp.down_proj.weight")
_TOP = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class ReferenceImportError(ValueError):
    """The checkpoint is not in the reference layout, or uses a feature zebra's model cannot reproduce."""


# ------------------------------------------------------------------------------------------------ names
def reference_to_zebra_key(key: str) -> str:
    """Our parameter name for a reference checkpoint key (ReferenceImportError for one we do not know)."""
    if key in _TOP:
        return key
    m = _LAYER.match(key)
    if m:
        i, rest = m.groups()
        if rest in _SHARED:
            return key
        if rest.startswith("mla."):
            module, _, leaf = rest[len("mla."):].partition(".")
            if module in _MLA_RENAME and leaf == "weight":
                return f"model.layers.{i}.mixer.{_MLA_RENAME[module]}.weight"
        if rest.startswith("mamba.") and rest[len("mamba."):] in _MAMBA_PARAMS:
            return f"model.layers.{i}.mixer.{rest[len('mamba.'):]}"
    raise ReferenceImportError(f"checkpoint key {key!r} has no counterpart in the zebra model (a latent layer norm, "
                               "a bias or a q_proj without a q rank are not supported)")


def zebra_to_reference_key(key: str, layer_types: list[str]) -> str:
    """The reference checkpoint's name for one of our parameters (the inverse of `reference_to_zebra_key`)."""
    if key in _TOP:
        return key
    m = _LAYER.match(key)
    if m:
        i, rest = m.groups()
        if rest in _SHARED:
            return key
        if rest.startswith("mixer."):
            leaf = rest[len("mixer."):]
            if layer_types[int(i)] == "mla":
                inverse = {v: k for k, v in _MLA_RENAME.items()}
                module, _, tail = leaf.partition(".")
                if module in inverse and tail == "weight":
                    return f"model.layers.{i}.mla.{inverse[module]}.weight"
            elif leaf in _MAMBA_PARAMS:
                return f"model.layers.{i}.mamba.{leaf}"
    raise ReferenceImportError(f"zebra parameter {key!r} has no counterpart in the reference layout")


# ------------------------------------------------------------------------------------------------ reading
def resolve_checkpoint(src: str | Path) -> Path:
    """A local directory, or a hub id downloaded (config, hybrid config, weights, tokenizer) to the HF cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(src).startswith((".", "/", "~")):
        raise ReferenceImportError(f"{src} is not a checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                                "*.txt", "*.jinja"]))
    except Exception as err:  # noqa: BLE001 - network / auth / offline: one clear message
        raise ReferenceImportError(
            f"cannot download {src!r} from the Hugging Face hub ({type(err).__name__}: {err}); download it "
            "elsewhere (huggingface-cli download) and pass the local directory") from err


def read_configs(ckpt: Path) -> tuple[dict, dict]:
    """(base config.json, hybrid_config.json) as dicts."""
    for name in ("config.json", HYBRID_CONFIG):
        if not (ckpt / name).is_file():
            raise ReferenceImportError(
                f"{ckpt} has no {name}: not a released Zebra-Llama checkpoint (expected config.json + {HYBRID_CONFIG}"
                " + weights)")
    return json.loads((ckpt / "config.json").read_text()), json.loads((ckpt / HYBRID_CONFIG).read_text())


def read_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint: model.safetensors, sharded *.safetensors (with or without an index) or
    pytorch_model*.bin."""
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    if files:
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
        return sd
    bins = sorted(ckpt.glob("pytorch_model*.bin"))
    if bins:
        sd = {}
        for f in bins:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        return sd
    raise ReferenceImportError(f"{ckpt} holds no weights (*.safetensors or pytorch_model*.bin)")


# ------------------------------------------------------------------------------------------------ config
def _base_rope(base: dict) -> dict:
    rp = base.get("rope_parameters")
    if rp:
        return dict(rp)
    rs = dict(base.get("rope_scaling") or {})
    rs.setdefault("rope_type", rs.pop("type", "default"))
    rs["rope_theta"] = float(base.get("rope_theta", 10000.0))
    return rs


def mla_rope_parameters(base: dict, hybrid: dict) -> tuple[dict, str]:
    """`rope_parameters` for a ZebraConfig whose `mla_rope="reference"` rotary embedding reproduces the reference
    MLA RoPE of `hybrid` (YaRN factor f over the original length, theta), and a note on what was kept of the base's.

    Our reference RoPE reads its factor from a llama3 `factor` (1 for rope_type default), its original length from
    `original_max_position_embeddings` and theta from `rope_theta`; the base's llama3 frequency band
    (low/high_freq_factor) only matters for the "pairs" variant and is kept as it was.
    """
    rs = dict(hybrid.get("rope_scaling") or {})
    base_rp = _base_rope(base)
    theta = float(hybrid.get("rope_theta") or base_rp.get("rope_theta", 10000.0))
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "yarn":
            raise ReferenceImportError(f"hybrid_config rope_scaling.rope_type {kind!r} is not supported (yarn)")
        for k, want in SUPPORTED_YARN.items():
            if k in rs and float(rs[k]) != float(want):
                raise ReferenceImportError(f"hybrid_config rope_scaling.{k}={rs[k]} is not supported (only {want})")
        factor = float(rs.get("factor", 1.0))
        original = int(rs.get("original_max_position_embeddings", 4096))  # the reference class's default
    else:  # no scaling: plain RoPE on the d_rope grid, as YaRN with factor 1
        factor, original = 1.0, int(hybrid.get("max_position_embeddings") or base.get("max_position_embeddings"))
    if factor == 1.0:
        rp = {"rope_type": "default", "rope_theta": theta}
    else:
        rp = {"rope_type": "llama3", "rope_theta": theta, "factor": factor,
              "low_freq_factor": float(base_rp.get("low_freq_factor", 1.0)),
              "high_freq_factor": float(base_rp.get("high_freq_factor", 4.0)),
              "original_max_position_embeddings": original}
    note = (f"MLA RoPE: YaRN factor {factor:g}, original length {original}, theta {theta:g} (reference); base RoPE "
            f"{base_rp}")
    return rp, note


def _check_hybrid(base: dict, hybrid: dict) -> None:
    def need(cond, msg):
        if not cond:
            raise ReferenceImportError(msg)

    n = int(base["num_hidden_layers"])
    need(int(hybrid.get("n_layer", n)) == n, f"hybrid_config n_layer {hybrid.get('n_layer')} != config.json "
         f"num_hidden_layers {n}")
    for k in ("hidden_size", "intermediate_size", "num_attention_heads"):
        if k in hybrid:
            need(int(hybrid[k]) == int(base[k]), f"hybrid_config {k} {hybrid[k]} != config.json {k} {base[k]}")
    need(int(hybrid.get("d_model", base["hidden_size"])) == int(base["hidden_size"]), "d_model != hidden_size")
    need(not hybrid.get("use_lora_layer_norm"), "use_lora_layer_norm=true (RMSNorms on the MLA latents) is not "
         "supported: zebra's MLA has no latent norms (the released configs set it false)")
    need(not hybrid.get("use_full_kv_head"), "use_full_kv_head=true (MLA with h KV heads) is not supported")
    need(not hybrid.get("attention_bias"), "attention_bias=true is not supported (zebra's MLA has no biases)")
    g_base = int(base.get("num_key_value_heads") or base["num_attention_heads"])
    need(int(hybrid.get("num_key_value_heads", g_base)) == g_base,
         f"hybrid_config num_key_value_heads {hybrid.get('num_key_value_heads')} != the base's {g_base}")
    need(hybrid.get("hidden_act", "silu") == "silu", f"hidden_act {hybrid.get('hidden_act')!r} is not supported")
    ssm = dict(hybrid.get("ssm_cfg") or {})
    for k, v in ssm.items():
        if k not in SUPPORTED_SSM:
            raise ReferenceImportError(f"ssm_cfg.{k} is not a Mamba2 option zebra knows")
        if SUPPORTED_SSM[k] is not None and v != SUPPORTED_SSM[k]:
            raise ReferenceImportError(f"ssm_cfg.{k}={v!r} is not supported (zebra's Mamba2 implements "
                                       f"{k}={SUPPORTED_SSM[k]!r})")
    if "dt_limit" in ssm and [float(x) for x in ssm["dt_limit"]] != [0.0, float("inf")]:
        raise ReferenceImportError(f"ssm_cfg.dt_limit={ssm['dt_limit']} is not supported (no dt clamping)")
    d_inner = hybrid.get("d_inner")
    if ssm.get("d_ssm") is not None and d_inner is not None and int(ssm["d_ssm"]) != int(d_inner):
        raise ReferenceImportError(f"ssm_cfg.d_ssm={ssm['d_ssm']} != d_inner {d_inner} (a gated-MLP part of the "
                                   "Mamba2 block) is not supported")


def reference_zebra_config(base: dict, hybrid: dict, state_dict: dict[str, torch.Tensor]):
    """The ZebraConfig of a reference checkpoint: base dims from config.json, the layer mix and dims from
    hybrid_config.json, ranks from the weights' shapes (all MLA layers must agree), `mla_rope="reference"`."""
    from zebra.model import ZebraConfig

    _check_hybrid(base, hybrid)
    n = int(base["num_hidden_layers"])
    h = int(base["num_attention_heads"])
    g = int(base.get("num_key_value_heads") or h)
    hd = int(base.get("head_dim") or int(base["hidden_size"]) // h)
    mla_layers = sorted(int(i) for i in hybrid.get("mla_layers") or [])
    bad = [i for i in mla_layers if not 0 <= i < n]
    if bad:
        raise ReferenceImportError(f"hybrid_config mla_layers {bad} out of range for {n} layers")
    layer_types = ["mla" if i in set(mla_layers) else "mamba" for i in range(n)]

    d_rope = int(hybrid.get("qk_rope_head_dim"))
    d_nope = int(hybrid.get("qk_nope_head_dim"))
    d_v = int(hybrid.get("v_head_dim"))
    ranks = set()
    for i in mla_layers:
        qa = state_dict.get(f"model.layers.{i}.mla.q_a_proj.weight")
        kva = state_dict.get(f"model.layers.{i}.mla.kv_a_proj_with_mqa.weight")
        if qa is None or kva is None:
            raise ReferenceImportError(f"layer {i} is listed in mla_layers but the checkpoint has no MLA weights "
                                       f"for it (model.layers.{i}.mla.q_a_proj / kv_a_proj_with_mqa)")
        ranks.add((int(qa.shape[0]), int(kva.shape[0]) - d_rope))
    if len(ranks) > 1:
        raise ReferenceImportError(f"the MLA layers have different ranks {sorted(ranks)} (layer_rank_list / dynamic "
                                   "ranks); zebra's config has one (q_lora_rank, kv_lora_rank) for all layers")
    r_q, r_kv = ranks.pop() if ranks else (int(hybrid["q_lora_rank"]), int(hybrid["kv_lora_rank"]))

    ssm = dict(hybrid.get("ssm_cfg") or {})
    nheads = int(ssm.get("ngroups", h))
    d_state = int(ssm.get("d_state", hd))
    d_inner = int(hybrid.get("d_inner") or nheads * d_state)
    d_xb = int(hybrid.get("d_xb") or g * hd)
    mamba = {"mamba_d_inner": d_inner, "mamba_d_xb": d_xb, "mamba_nheads": nheads, "mamba_headdim": d_state,
             "mamba_d_state": d_state, "mamba_d_conv": int(ssm.get("d_conv", 4)),
             "mamba_chunk_size": int(ssm.get("chunk_size", 256))}
    for src, dst in (("dt_min", "mamba_dt_min"), ("dt_max", "mamba_dt_max"), ("dt_init_floor", "mamba_dt_init_floor")):
        if src in ssm:
            mamba[dst] = float(ssm[src])
    if "A_init_range" in ssm:
        mamba["mamba_A_init_min"], mamba["mamba_A_init_max"] = (float(x) for x in ssm["A_init_range"])

    rope_parameters, _ = mla_rope_parameters(base, hybrid)
    eps = float(hybrid.get("rms_norm_eps", base.get("rms_norm_eps", 1e-5)))
    try:
        return ZebraConfig(
            vocab_size=int(base["vocab_size"]), hidden_size=int(base["hidden_size"]),
            intermediate_size=int(base["intermediate_size"]), num_hidden_layers=n, num_attention_heads=h,
            num_key_value_heads=g, head_dim=hd, hidden_act="silu", rms_norm_eps=eps,
            max_position_embeddings=int(base.get("max_position_embeddings", 8192)), rope_parameters=rope_parameters,
            tie_word_embeddings=bool(base.get("tie_word_embeddings", False)),
            bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"),
            pad_token_id=base.get("pad_token_id"), hybrid_layer_types=layer_types, q_lora_rank=r_q, kv_lora_rank=r_kv,
            qk_rope_head_dim=d_rope, qk_nope_head_dim=d_nope, v_head_dim=d_v, mla_rope="reference", **mamba)
    except ValueError as err:
        raise ReferenceImportError(f"the reference checkpoint's dimensions do not fit zebra's model: {err}") from err


# ------------------------------------------------------------------------------------------------ conversion
def convert_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Rename every reference key to ours, checking each mixer key belongs to a layer of its kind."""
    out = {}
    for key, value in state_dict.items():
        new = reference_to_zebra_key(key)
        m = _LAYER.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i >= config.num_hidden_layers:
                raise ReferenceImportError(f"{key}: layer {i} does not exist ({config.num_hidden_layers} layers)")
            kind = config.hybrid_layer_types[i]
            if (rest.startswith("mla.") and kind != "mla") or (rest.startswith("mamba.") and kind != "mamba"):
                raise ReferenceImportError(f"{key} is a {rest.split('.')[0]} weight but hybrid_config lists layer {i} "
                                           f"as {kind}")
        if new in out:
            raise ReferenceImportError(f"two checkpoint keys map to {new}")
        out[new] = value
    return out


def load_reference(src: str | Path, dtype: torch.dtype | None = None):
    """(ZebraForCausalLM in eval mode, tokenizer or None, info dict) for a reference checkpoint (directory or hub
    id). `dtype`: default the checkpoint's (bf16 for the releases); A_log, D, dt_bias stay fp32."""
    from transformers.initialization import no_init_weights

    from zebra.model import ZebraForCausalLM

    ckpt = resolve_checkpoint(src)
    base, hybrid = read_configs(ckpt)
    sd = read_state_dict(ckpt)
    config = reference_zebra_config(base, hybrid, sd)
    state = convert_state_dict(sd, config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if (hybrid.get("ssm_cfg") or {}).get("conv_bias") is False:  # no conv bias: ours is zero
        for i, kind in enumerate(config.hybrid_layer_types):
            if kind == "mamba":
                w = state.get(f"model.layers.{i}.mixer.conv1d.weight")
                if w is not None:
                    state.setdefault(f"model.layers.{i}.mixer.conv1d.bias", torch.zeros(w.shape[0], dtype=w.dtype))
    if dtype is None:
        dtype = next((v.dtype for k, v in state.items() if k.endswith("embed_tokens.weight")), torch.float32)
    with no_init_weights():
        model = ZebraForCausalLM(config)
    model.to(dtype)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ReferenceImportError(f"the checkpoint does not fill the model: missing {missing[:8]}"
                                   f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}")
    for key, value in state.items():
        want = model.state_dict()[key].shape
        if tuple(value.shape) != tuple(want):
            raise ReferenceImportError(f"{zebra_to_reference_key(key, config.hybrid_layer_types)} has shape "
                                       f"{tuple(value.shape)}, zebra expects {tuple(want)}")
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    if config.tie_word_embeddings:
        model.tie_weights()
    for module in model.modules():  # non-persistent buffers were not initialised (no_init_weights)
        if hasattr(module, "reset_inv_freq"):
            module.reset_inv_freq()
    model.eval()
    tokenizer = None
    if any((ckpt / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    _, rope_note = mla_rope_parameters(base, hybrid)
    info = {"source": str(src), "checkpoint": str(ckpt), "base": base.get("_name_or_path"),
            "mla_layers": config.mla_layers, "q_lora_rank": config.q_lora_rank, "kv_lora_rank": config.kv_lora_rank,
            "rope": rope_note, "tensors": len(sd)}
    return model, tokenizer, info


def model_card(info: dict, model) -> str:
    from zebra.plan.describe import count_parameters
    from zebra.model.cache import measure_cache_bytes

    kv = measure_cache_bytes(model.config)["kv_fraction"]
    return "\n".join([
        f"# {info['source']} (imported into zebra)", "",
        "A released Zebra-Llama checkpoint (AMD; arXiv 2505.17272) converted to zebra's ZebraForCausalLM by "
        "`python -m zebra.compose.reference_import`; weights unchanged, parameter names mapped one to one.", "",
        "| | |", "|---|---|",
        f"| base | {info.get('base')} |",
        f"| MLA layers | {info['mla_layers']} (the rest Mamba2) |",
        f"| r_q / r_kv | {info['q_lora_rank']} / {info['kv_lora_rank']} |",
        f"| KV cache vs base | {100 * kv:.3f}% |",
        f"| parameters | {count_parameters(model):,} |",
        f"| RoPE | {info['rope']} |", "",
        "Load with `import zebra; AutoModelForCausalLM.from_pretrained(path)` (or `trust_remote_code=True`).", ""])


def import_reference(src: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert a reference checkpoint and export it with `zebra.model.export.save_hf_model` (model code, tokenizer,
    model card); returns the export directory."""
    from zebra.model.export import save_hf_model

    model, tokenizer, info = load_reference(src, dtype)
    return save_hf_model(model, out_dir, tokenizer=tokenizer, model_card=model_card(info, model))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zebra.compose.reference_import", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help=f"checkpoint directory or hub id (released: {', '.join(RELEASED[:2])}, ...)")
    ap.add_argument("out", help="output directory for the zebra export")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: the checkpoint's")
    args = ap.parse_args(argv)
    try:
        out = import_reference(args.src, args.out, getattr(torch, args.dtype) if args.dtype else None)
    except ReferenceImportError as err:
        print(f"error: {err}")
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
