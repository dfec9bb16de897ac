"""Full-depth students built from the base, and the hybrid assembled from them (METHOD.md §1, §3, §5).

`build_student` makes an all-MLA or all-Mamba2 ZebraForCausalLM: every attention is replaced by the new
mixer (initialised from that attention's weights, as the `init` options say: conf/init/), and the MLPs,
norms, embeddings, final norm and LM head are copied from the base. `assemble_hybrid` takes each whole decoder
layer (mixer + MLP + both norms) from the ILD'd student of the matching kind.
"""

from __future__ import annotations

import copy

import torch
from transformers.initialization import no_init_weights

from zebra.compose.calibration import (attention_input_covariances, check_init_options, match_mamba_output_scales,
                                      needs_calibration)
from zebra.compose.init_mla import init_mamba_from_attention, init_mla_from_attention
from zebra.compose.teacher import check_teacher_config, zebra_config_from_teacher
from zebra.model import ZebraForCausalLM

# Config fields that must agree for two students to come from the same base (shape and numerics).
BASE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_parameters",
               "tie_word_embeddings")
MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "mla_rope",
              "rope_key")
MAMBA_FIELDS = ("mamba_d_inner", "mamba_d_xb", "mamba_nheads", "mamba_headdim", "mamba_d_state", "mamba_d_conv",
                "mamba_chunk_size", "mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor", "mamba_A_init_min",
                "mamba_A_init_max")


@torch.no_grad()
def copy_shared_weights(base, student) -> None:
    """Embeddings, final norm, LM head, and every layer's MLP and both RMSNorms: base -> student."""
    student.model.embed_tokens.weight.copy_(base.model.embed_tokens.weight)
    student.model.norm.weight.copy_(base.model.norm.weight)
    if not student.config.tie_word_embeddings:
        student.lm_head.weight.copy_(base.lm_head.weight)
    for src, dst in zip(base.model.layers, student.model.layers):
        dst.input_layernorm.weight.copy_(src.input_layernorm.weight)
        dst.post_attention_layernorm.weight.copy_(src.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(dst.mlp, name).weight.copy_(getattr(src.mlp, name).weight)


def _attention_weights(layer) -> tuple[torch.Tensor, ...]:
    attn = layer.self_attn
    return attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight


@torch.no_grad()
def build_student(teacher_model, zebra_config_kwargs: dict | None = None, kind: str = "mla",
                  dtype: torch.dtype | None = None, init: dict | None = None, calibration: list[dict] | None = None):
    """An all-MLA (`kind="mla"`) or all-Mamba2 (`kind="mamba"`) student of a Llama base.

    `zebra_config_kwargs`: ZebraConfig fields beyond the base's dims (q_lora_rank, kv_lora_rank,
    qk_rope_head_dim, qk_nope_head_dim, v_head_dim, mla_rope, rope_key, mamba_*); unset ones take ZebraConfig's
    defaults. `init`: the init options of conf/init/ (mla_svd, mamba_conv, mamba_scale; default plain SVD,
    default conv, no scale); `calibration`: token rows ({"input_ids": [1, n]}, zebra.compose.calibration) of the
    base's data that the activation-aware SVD and the matched Mamba2 scale are computed on (used only by them).
    Ranks are validated from the config before any weight is copied. The student is built in float32 (float64
    for a float64 base) unless `dtype` is given; A_log, D and dt_bias stay fp32 under any cast.
    Returns (student in eval mode, report) where the report lists each layer's initialisation errors.
    """
    if kind not in ("mla", "mamba"):
        raise ValueError(f"kind must be 'mla' or 'mamba', got {kind!r}")
    init = check_init_options(init)
    uses_rows = (init["mla_svd"] == "activation_aware") if kind == "mla" else (init["mamba_scale"] == "matched")
    if needs_calibration(init) and uses_rows and not calibration:
        raise ValueError(f"init {init} needs calibration rows of the base's data, none given")
    check_teacher_config(teacher_model.config)
    kwargs = dict(zebra_config_kwargs or {})
    kwargs.pop("hybrid_layer_types", None)  # the kind decides the layer types
    num_layers = teacher_model.config.num_hidden_layers
    config = zebra_config_from_teacher(teacher_model.config, [kind] * num_layers, **kwargs)

    base_dtype = teacher_model.model.embed_tokens.weight.dtype
    build_dtype = torch.float64 if base_dtype == torch.float64 else torch.float32
    device = teacher_model.model.embed_tokens.weight.device
    with torch.device(device):
        student = ZebraForCausalLM(config).to(build_dtype)
    copy_shared_weights(teacher_model, student)

    covariances = None
    if kind == "mla" and init["mla_svd"] == "activation_aware":
        covariances = attention_input_covariances(teacher_model, calibration)
    layer_reports = []
    for i, (src, dst) in enumerate(zip(teacher_model.model.layers, student.model.layers)):
        weights = _attention_weights(src)
        if kind == "mla":
            cov = covariances[i] if covariances is not None else None
            rep = init_mla_from_attention(dst.mixer, *weights, config, input_covariance=cov)
        else:
            rep = init_mamba_from_attention(dst.mixer, *weights, conv=init["mamba_conv"])
        layer_reports.append({"layer": i, **rep})
    if kind == "mamba" and init["mamba_scale"] == "matched":
        student.eval()  # the scale is matched on the mixer as it will first run
        scales = match_mamba_output_scales(teacher_model, student, calibration)
        for rep, scale in zip(layer_reports, scales):
            rep["out_scale"] = scale
    if dtype is not None:
        student.to(dtype)
    student.eval()
    report = {"kind": kind, "config": {k: getattr(config, k) for k in MLA_FIELDS + ("mamba_d_xb", "mamba_nheads")},
              "init": {k: init[k] for k in (("mla_svd",) if kind == "mla" else ("mamba_conv", "mamba_scale"))},
              "calibration_tokens": sum(r["input_ids"].numel() for r in calibration or ()) if uses_rows else 0,
              "layers": layer_reports}
    if kind == "mla":
        keys = ("q_truncation", "kv_truncation", "q_effective", "k_nope_effective", "v_effective", "k_rope_effective")
        report["mean"] = {k: sum(r[k] for r in layer_reports) / num_layers for k in keys}
    return student, report


def _check_same_base(a, b, fields=BASE_FIELDS, what="students") -> None:
    diff = [f for f in fields if getattr(a.config, f) != getattr(b.config, f)]
    if diff:
        detail = ", ".join(f"{f}: {getattr(a.config, f)!r} vs {getattr(b.config, f)!r}" for f in diff)
        raise ValueError(f"{what} were not built from the same base shape ({detail})")


@torch.no_grad()
def hybrid_config(mla_config, mamba_config, mla_indices):
    """The hybrid's ZebraConfig: the MLA student's, with the Mamba2 student's Mamba fields and MLA at
    `mla_indices` (validated indices; `assemble_hybrid` checks them)."""
    chosen = {int(i) for i in mla_indices}
    config = copy.deepcopy(mla_config)
    for f in MAMBA_FIELDS:
        setattr(config, f, getattr(mamba_config, f))
    config.hybrid_layer_types = ["mla" if i in chosen else "mamba" for i in range(mla_config.num_hidden_layers)]
    config.check()
    return config


def assemble_hybrid(mla_student, mamba_student, mla_indices, check_embeddings: bool = True):
    """The hybrid with MLA at `mla_indices` and Mamba2 elsewhere, each WHOLE decoder layer (mixer, MLP and both
    norms) copied from the student of the matching kind.

    Embeddings, final norm and LM head come from the MLA student. Embeddings and head are frozen during ILD, so
    both students hold the base's; the final norm is trained under ILD's default `normed` last-layer target and
    the two copies differ. We take the MLA student's because its last layer is, layer for layer, the closer
    approximation of the base's attention (the SVD init is near-exact at full rank), so its final norm was fitted
    to residual streams more like the hybrid's. The choice is a convention, not from the paper.

    Raises ValueError for indices out of range or repeated, for students of different base shapes, and for a
    student whose layer at a used index is not of the needed kind.
    """
    num_layers = mla_student.config.num_hidden_layers
    _check_same_base(mla_student, mamba_student)
    try:
        indices = sorted(int(i) for i in mla_indices)
    except (TypeError, ValueError) as err:
        raise ValueError(f"mla_indices must be integers, got {mla_indices!r}") from err
    if len(set(indices)) != len(indices):
        raise ValueError(f"mla_indices has duplicates: {list(mla_indices)}")
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"mla_indices {bad} out of range for a {num_layers}-layer model")
    chosen = set(indices)
    layer_types = ["mla" if i in chosen else "mamba" for i in range(num_layers)]
    for i, kind in enumerate(layer_types):
        src = mla_student if kind == "mla" else mamba_student
        if src.config.hybrid_layer_types[i] != kind:
            raise ValueError(f"layer {i} must come from the {kind} student, but that student's layer {i} is "
                             f"{src.config.hybrid_layer_types[i]!r}")
    if check_embeddings and not torch.equal(mla_student.model.embed_tokens.weight,
                                            mamba_student.model.embed_tokens.weight):
        raise ValueError("the students' embeddings differ: they were not built from the same base")

    config = hybrid_config(mla_student.config, mamba_student.config, indices)

    # Every parameter and persistent buffer is overwritten by the strict load below, so skip the random init
    # (minutes for an 8B model); non-persistent buffers (MLA's inv_freq) are computed in __init__ regardless.
    weight = mla_student.model.embed_tokens.weight
    with no_init_weights(), torch.device(weight.device):
        hybrid = ZebraForCausalLM(config)
    hybrid.to(weight.dtype)
    state = {}
    for key, value in mla_student.state_dict().items():
        if not key.startswith("model.layers."):
            state[key] = value
    for i, kind in enumerate(layer_types):
        src = mla_student if kind == "mla" else mamba_student
        prefix = f"model.layers.{i}."
        state.update({f"{prefix}{k}": v for k, v in src.model.layers[i].state_dict().items()})
    hybrid.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        hybrid.tie_weights()
    hybrid.train(mla_student.training)
    return hybrid
