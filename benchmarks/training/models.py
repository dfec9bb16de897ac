"""What the training benchmark builds: the students' and teachers' configs from conf/ (zebra_1b with the paper mix,
an 8B-shaped KD teacher), the models on the device with random weights, the optimizer as the stages group it, and
token-mixture batches."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import OmegaConf

from zebra.utils.paths import config_dir

CONF = config_dir()


# ------------------------------------------------------------------------------------------------ configs
def load_preset(name: str):
    return OmegaConf.load(CONF / "model" / f"{name}.yaml")


def smoke_preset(hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                 vocab: int = 512):
    """conf/model/tiny.yaml with a small vocabulary and a short SSD chunk (so a 64-token row has 4 chunks)."""
    p = load_preset("tiny")
    p.base.vocab_size = vocab
    p.base.hidden_size, p.base.num_hidden_layers = hidden, layers
    p.base.num_attention_heads, p.base.num_key_value_heads, p.base.head_dim = heads, kv_heads, head_dim
    p.base.intermediate_size = 2 * hidden
    p.mla.mamba_chunk_size = 16
    return p


def build_shapes(smoke: bool) -> dict:
    """ZebraConfigs of the students and LlamaConfigs of the teachers (architecture numbers only)."""
    from zebra.plan.describe import zebra_config_from_preset
    from zebra.plan.mixes import layer_types_for, resolve_mla_layers
    from zebra.stages.teacher import llama_config_from_base

    if smoke:
        student, kd_teacher = smoke_preset(), smoke_preset(hidden=96, layers=2, head_dim=24)
        kd_teacher.base.tie_word_embeddings = False
    else:
        student, kd_teacher = load_preset("zebra_1b"), load_preset("zebra_8b")
    mix = OmegaConf.load(CONF / "mix" / "paper.yaml")
    cfg = OmegaConf.create({"model": student, "mix": mix})  # resolves mix.mla_layers = model.paper_mla_layers
    L = int(student.base.num_hidden_layers)
    mla_layers = resolve_mla_layers(OmegaConf.to_container(cfg.mix, resolve=True), L)
    shapes = {
        "kd_student": zebra_config_from_preset(cfg.model, layer_types_for(L, mla_layers)),
        "kd_teacher": llama_config_from_base(kd_teacher.base),
        "ild_teacher": llama_config_from_base(student.base),
        "ild_mla": zebra_config_from_preset(cfg.model, ["mla"] * L),
        "ild_mamba": zebra_config_from_preset(cfg.model, ["mamba"] * L),
    }
    for name in ("kd_teacher", "ild_teacher"):
        shapes[name]._attn_implementation = "sdpa"  # as zebra.stages.teacher.load_teacher_model
    if shapes["kd_teacher"].vocab_size != shapes["kd_student"].vocab_size:
        raise ValueError("KD teacher and student vocabularies differ")
    return shapes


def config_summary(config) -> dict:
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "hybrid_layer_types",
            "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "mamba_d_inner",
            "mamba_d_xb", "mamba_nheads", "mamba_headdim", "mamba_d_state", "mamba_d_conv", "mamba_chunk_size")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


# ------------------------------------------------------------------------------------------------ models
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_teacher(config, device, dtype=torch.bfloat16, seed: int = 0):
    """A random frozen LlamaForCausalLM built directly on `device` in `dtype` (an 8B model in fp32 on the host
    first would take minutes): what zebra.stages.teacher.load_teacher_model("random:<seed>") gives, placed."""
    from transformers import LlamaForCausalLM

    from zebra.stages.teacher import freeze

    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    return freeze(model)


def build_student(config, device, seed: int = 1):
    """A random ZebraForCausalLM with fp32 (master) weights on `device`, in train mode."""
    from zebra.model import ZebraForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = ZebraForCausalLM(config)
    return model.float().train()


def make_optimizer(module, lr: float, device):
    """AdamW(fused=True) over the module's trainable parameters, grouped as StageModule.configure_optimizers
    groups them (weight decay 0, as conf/kd and conf/ilkd)."""
    from zebra.stages.optim import param_groups

    groups = param_groups(module.trainable_named_parameters(), 0.0)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)


# ------------------------------------------------------------------------------------------------ batches
def make_batch(batch_size: int, seq_len: int, vocab: int, device, docs: int = 1, seed: int = 0):
    """A token-mixture batch (as zebra.data.sft gives it): `docs` documents per row (position ids restart at 0 at
    each; the last token of each document has no next-token target), no padding. Returns (batch, document lengths)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    pos, mask, lengths = [], torch.ones(batch_size, seq_len, dtype=torch.bool), []
    for r in range(batch_size):
        if docs > 1:
            cuts = sorted(torch.randperm(seq_len - 1, generator=g)[: docs - 1].add(1).tolist())
        else:
            cuts = []
        bounds = [0] + cuts + [seq_len]
        row = [b - a for a, b in zip(bounds, bounds[1:])]
        lengths.append(row)
        pos.append(torch.cat([torch.arange(n) for n in row]))
        for end in bounds[1:]:
            mask[r, end - 1] = False
    batch = {"input_ids": ids, "position_ids": torch.stack(pos), "loss_mask": mask,
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
    return {k: v.to(device) for k, v in batch.items()}, lengths
