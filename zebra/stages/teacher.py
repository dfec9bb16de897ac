"""The frozen teacher of a stage: loading (with its tokenizer checks), where and in which dtype it lives, and its
packed forward with the students' masking (DESIGN §2, §5)."""

from __future__ import annotations

import dataclasses

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from zebra.compose.teacher import Teacher, load_teacher, load_tokenizer, tokenizer_differences
from zebra.model.packing import packed_attention_mask
from zebra.stages.errors import StageError, TokenizerMismatchError
from zebra.stages.zero import zero_stage


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {None: torch.float32, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64,
             "float64": torch.float64}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(k for k in table if k)}")
    return table[name]


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    return module


# ------------------------------------------------------------------------------------------------ loading
def llama_config_from_base(base: dict):
    """A LlamaConfig from a `model.base` block of the config (architecture numbers only)."""
    from transformers import LlamaConfig

    base = OmegaConf.to_container(base, resolve=True) if OmegaConf.is_config(base) else dict(base)
    return LlamaConfig(**base)


def load_teacher_model(spec: str, base: dict | None = None, dtype=torch.float32,
                       device: torch.device | str | None = None) -> Teacher:
    """The frozen base/teacher Llama named by `spec` (zebra.compose.teacher.load_teacher: an embedded name, a GGUF
    file, a local directory, a hub id, or `random:<seed>` built from `base`, the `model.base` block, on `device`)."""
    if str(spec).startswith("random:") and base is None:
        raise StageError(f"teacher {spec!r} needs the model.base block to build a random Llama")
    t = load_teacher(str(spec), dtype=dtype, device=device or "cpu",
                     base=llama_config_from_base(base) if base is not None else None)
    freeze(t.model)
    return t


def load_model_tokenizer(spec: str):
    """The tokenizer named by `model.tokenizer` / a teacher spec (zebra.compose.teacher.load_tokenizer)."""
    return load_tokenizer(spec)


def check_tokenizers_match(student_tok, teacher_tok, student_name: str, teacher_name: str,
                           student_vocab: int | None = None, teacher_vocab: int | None = None) -> None:
    diffs = tokenizer_differences(student_tok, teacher_tok)
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        diffs.append(f"LM-head rows {student_vocab} vs {teacher_vocab}")
    if diffs:
        raise TokenizerMismatchError(
            f"teacher {teacher_name!r} and student {student_name!r} tokenizers differ ({'; '.join(diffs)}): KD "
            "compares distributions over the same token ids, so the teacher must share the student's tokenizer")


# ------------------------------------------------------------------------------------------------ placement
def teacher_placement(cfg: DictConfig, trainer: pl.Trainer | None) -> str:
    """`teacher_placement` checked: "replicated" or "zero3" (the latter only with a DeepSpeed strategy, whose
    process group the teacher's engine joins)."""
    placement = str(cfg.teacher_placement)
    if placement not in ("replicated", "zero3"):
        raise StageError(f"teacher_placement must be 'replicated' or 'zero3', got {placement!r}")
    if placement == "zero3" and zero_stage(trainer) == 0:
        raise StageError("teacher_placement=zero3 partitions the teacher with DeepSpeed: use a DeepSpeed strategy "
                         "(strategy=deepspeed_zero2 | deepspeed_zero3 | deepspeed_zero3_offload)")
    return placement


def teacher_device(trainer: pl.Trainer | None) -> torch.device:
    """Where this rank's frozen teacher lives: the rank's GPU, else the CPU (then moved in on_fit_start)."""
    device = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return device if device is not None and device.type == "cuda" else torch.device("cpu")


def teacher_dtype(cfg: DictConfig) -> torch.dtype:
    """`teacher_dtype`; auto: bf16 on GPUs, fp32 on CPU."""
    name = cfg.teacher_dtype
    if name in (None, "auto"):
        acc = str(cfg.trainer.accelerator)
        return torch.bfloat16 if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()) \
            else torch.float32
    return torch_dtype(name)


# ------------------------------------------------------------------------------------------------ forward
@dataclasses.dataclass
class TeacherOutputs:
    last_hidden_state: torch.Tensor  # after the final norm [B, T, H]
    hidden_states: tuple | None = None  # HF convention: L + 1 entries, [0] embeddings, [l] enters layer l, [-1] normed
    mixer_outputs: list | None = None  # per layer: self_attn output (after o_proj, before the residual add)
    last_unnormed: torch.Tensor | None = None  # last decoder layer's output before the final norm


@torch.no_grad()
def teacher_forward(teacher: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, *, hidden_states: bool = False,
                    mixer_outputs: bool = False, last_unnormed: bool = False) -> TeacherOutputs:
    """One frozen forward of a Llama teacher (LlamaForCausalLM) over a packed batch, with the students' masking:
    per-document position ids and the block-causal mask (DESIGN §2). Returns final hidden states (no logits:
    the KD loss builds them chunk by chunk) and, on request, every layer's input, every attention output
    (forward hooks on `self_attn`, never `output_attentions`) and the last layer's un-normed output."""
    inner = teacher.model
    embeds = inner.embed_tokens(input_ids)
    mask = packed_attention_mask(position_ids, attention_mask, embeds.dtype,
                                 getattr(teacher.config, "_attn_implementation", "sdpa"))
    handles, mixers, last = [], [None] * len(inner.layers) if mixer_outputs else None, {}
    try:
        if mixer_outputs:
            for i, layer in enumerate(inner.layers):
                def grab(_m, _a, out, i=i):
                    mixers[i] = out[0] if isinstance(out, tuple) else out
                handles.append(layer.self_attn.register_forward_hook(grab))
        if last_unnormed:
            def grab_last(_m, _a, out):
                last["h"] = out[0] if isinstance(out, tuple) else out
            handles.append(inner.layers[-1].register_forward_hook(grab_last))
        out = inner(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False,
                    output_hidden_states=hidden_states)
    finally:
        for h in handles:
            h.remove()
    return TeacherOutputs(out.last_hidden_state, tuple(out.hidden_states) if hidden_states else None, mixers,
                          last.get("h"))
