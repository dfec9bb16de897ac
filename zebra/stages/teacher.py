"""The frozen teacher of a stage: loading (with its tokenizer checks), where and in which dtype it lives, and its
packed forward with the students' masking (DESIGN §2, §5)."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from zebra.model.packing import block_causal_mask, doc_ids_from_position_ids, is_packed
from zebra.stages.errors import StageError, TokenizerMismatchError
from zebra.stages.zero import zero_stage

EMBEDDED_QUANTISATION = {"smollm2_135m": "4-bit GGUF (Q4_1 weights, Q8_0 embeddings), dequantised to float"}


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
@dataclasses.dataclass
class LoadedTeacher:
    model: nn.Module  # LlamaForCausalLM, frozen, eval
    source: str
    quantisation: str  # "none", or how the weights were quantised
    path: str | None = None
    tokenizer: Any = None  # the tokenizer shipped with the weights (None for `random:`)


def llama_config_from_base(base: dict):
    """A LlamaConfig from a `model.base` block of the config (architecture numbers only)."""
    from transformers import LlamaConfig

    base = OmegaConf.to_container(base, resolve=True) if OmegaConf.is_config(base) else dict(base)
    return LlamaConfig(**base)


def load_teacher_model(spec: str, base: dict | None = None, dtype=torch.float32,
                       device: torch.device | str | None = None) -> LoadedTeacher:
    """The frozen base/teacher Llama named by `spec`.

    `random:<seed>` builds a random LlamaForCausalLM from `base` (the `model.base` block) with that seed: tests
    and smoke runs need nothing from the hub. Anything else goes to `zebra.compose.teacher.load_teacher` (embedded
    name, GGUF file, local directory, hub id).
    """
    from transformers import LlamaForCausalLM

    spec = str(spec)
    if spec.startswith("random:"):
        if base is None:
            raise StageError(f"teacher {spec!r} needs the model.base block to build a random Llama")
        seed = int(spec.split(":", 1)[1] or 0)
        config = llama_config_from_base(base)
        config._attn_implementation = "sdpa"
        # built in its final dtype, on its device (an 8B random init takes seconds on a GPU, minutes on CPU)
        previous = torch.get_default_dtype()
        with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
            torch.manual_seed(seed)
            torch.set_default_dtype(dtype)
            try:
                model = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
        model.to(dtype)
        return LoadedTeacher(freeze(model), spec, f"none (random init, seed {seed})")
    from zebra.compose.teacher import load_teacher

    t = load_teacher(spec, dtype=dtype)
    if device is not None:
        t.model.to(device)
    quant = EMBEDDED_QUANTISATION.get(spec) or ("GGUF (quantised), dequantised to float"
                                                if str(spec).endswith(".gguf") else "none")
    return LoadedTeacher(freeze(t.model), spec, quant, t.path, t.tokenizer)


def load_model_tokenizer(spec: str):
    """The tokenizer named by `model.tokenizer` / a teacher spec: an embedded name, a directory, a GGUF or a hub id."""
    from zebra.compose.teacher import load_tokenizer

    spec = str(spec)
    if spec.startswith("random:"):
        raise StageError(f"{spec!r} names a random model, not a tokenizer; set model.tokenizer")
    return load_tokenizer(spec)


def tokenizer_differences(a, b) -> list[str]:
    """What differs between two tokenizers in ways that change token ids or special tokens."""
    diffs = []
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        diffs.append(f"vocabulary size {len(va)} vs {len(vb)}")
    elif va != vb:
        n = sum(1 for k, v in va.items() if vb.get(k) != v)
        diffs.append(f"{n} vocabulary entries map to different ids")
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        x, y = getattr(a, attr, None), getattr(b, attr, None)
        if x != y:
            diffs.append(f"{attr} {x!r} vs {y!r}")
    sa = sorted(map(str, getattr(a, "all_special_tokens", []) or []))
    sb = sorted(map(str, getattr(b, "all_special_tokens", []) or []))
    if sa != sb:
        diffs.append(f"special tokens {sa[:8]} vs {sb[:8]}")
    return diffs


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
def packed_attention_mask(config, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          dtype: torch.dtype) -> torch.Tensor | None:
    """The teacher's 4-D mask for a (possibly packed, possibly right-padded) batch.

    transformers' `create_causal_mask` returns a 4-D mask as given, so the teacher sees exactly the students'
    block-causal structure: queries attend keys of their own document only, never padding. SDPA takes a boolean
    mask (True = attend); eager attention adds the mask, so it gets 0 / -inf-like floats. None when the batch
    is one unpadded document per row (plain causal attention, the fastest path).
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and not is_packed(position_ids):
        return None
    mask = block_causal_mask(doc_ids_from_position_ids(position_ids), attention_mask if padded else None)
    impl = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if impl not in ("sdpa",):
        raise StageError(f"teacher attention implementation {impl!r} cannot take a packed (document-causal) mask; "
                         "use sdpa or eager")
    return mask


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
    mask = packed_attention_mask(teacher.config, position_ids, attention_mask, embeds.dtype)
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
