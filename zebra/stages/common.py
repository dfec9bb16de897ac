"""What every stage shares: teacher loading and its packed forward, tokenizer checks, optimisation (METHOD §4b),
the Lightning base module, trainer/logger/callback construction, and atomic exports with model card and report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from zebra.model import export
from zebra.utils import files
from zebra.plan.describe import count_parameters
from zebra.model.cache import measure_cache_bytes
from zebra.model.packing import block_causal_mask, doc_ids_from_position_ids, is_packed

log = logging.getLogger("zebra.stages")


# ------------------------------------------------------------------------------------------------ errors
class StageError(RuntimeError):
    """A stage cannot run with what it was given; the message names the problem."""


class TokenizerMismatchError(StageError):
    """Teacher and student tokenizers differ (KD over the vocabulary needs the same token ids)."""


class NonFiniteLossError(StageError):
    """The training loss became NaN or infinite."""


class MissingArtifactError(StageError):
    """A previous stage's export is missing."""


# ------------------------------------------------------------------------------------------------ misc
def set_threads(num_threads: int | None) -> None:
    """Intra-op threads: the configured number, else this process's share of the cores it may run on (the
    cores divided by the processes a launcher started on this node: LOCAL_WORLD_SIZE from torchrun,
    SLURM_NTASKS_PER_NODE under srun). Each process taking every core made the students' SVD init 10x slower
    on a two-GPU node (experiments/README.md)."""
    if not num_threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "1"
        try:
            share = max(1, int(str(local).split("(")[0]))
        except ValueError:
            share = 1
        num_threads = max(1, cores // share)
    torch.set_num_threads(max(1, int(num_threads)))


def to_container(cfg) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig,)) or OmegaConf.is_config(cfg) \
        else cfg


def config_hash(*parts) -> str:
    """Stable short hash of resolved config pieces (dicts, lists, scalars)."""
    blob = json.dumps([to_container(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


count_params = count_parameters


def kv_fraction(config) -> float:
    """KV cache per token of the hybrid relative to its base, measured from HybridCache allocations (DESIGN §2)."""
    return measure_cache_bytes(config)["kv_fraction"]


# ------------------------------------------------------------------------------------------------ stage identity
def _model_identity(cfg: DictConfig) -> dict:
    m = cfg.model
    return {"name": m.name, "teacher": m.teacher, "tokenizer": m.tokenizer, "base": m.base, "mla": m.mla}


def stage_hash(name: str, cfg: DictConfig) -> str:
    """Hash of everything a stage's result depends on, chained through the stages it reads from, so that
    `stage=pipeline` re-runs a stage when its own config or any upstream stage's changed."""
    sft = cfg.data.get("sft")
    if name == "ilkd":  # which students a run trains does not change either student's result
        ild = {k: v for k, v in to_container(cfg.ilkd).items() if k != "students"}
        return config_hash("ilkd", _model_identity(cfg), sft, ild, cfg.seed)
    if name == "smart":
        return config_hash("smart", stage_hash("ilkd", cfg), sft, cfg.smart, cfg.seed)
    if name == "kd":
        upstream = [stage_hash("ilkd", cfg)]
        if cfg.mix.get("selection") == "smart":
            upstream.append(stage_hash("smart", cfg))
        teacher = [cfg.model.kd_teacher, cfg.model.get("kd_teacher_base")]
        return config_hash("kd", upstream, cfg.mix, teacher, sft, cfg.kd, cfg.seed)
    if name == "dpo":
        return config_hash("dpo", stage_hash("kd", cfg), cfg.data.get("preference"), cfg.dpo, cfg.seed)
    raise ValueError(f"no stage hash for {name!r}")


# ------------------------------------------------------------------------------------------------ teacher
EMBEDDED_QUANTISATION = {"smollm2_135m": "4-bit GGUF (Q4_1 weights, Q8_0 embeddings), dequantised to float"}


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

    base = dict(to_container(base))
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
    """The tokenizer named by `model.tokenizer` / a teacher spec: an embedded name, a directory or a hub id."""
    from zebra.data.tokenizers import load_default_tokenizer, load_tokenizer

    spec = str(spec)
    if spec in ("smollm2_135m", "default"):
        return load_default_tokenizer()
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


# ------------------------------------------------------------------------------------------------ teacher forward
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


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
    if getattr(head, "bias", None) is not None:
        raise StageError("the chunked KD loss assumes an LM head without bias")
    return head.weight


def student_hidden(student: nn.Module, batch: dict) -> torch.Tensor:
    """Final (normed) hidden states of a ZebraForCausalLM on a packed batch; no logits."""
    return student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state


# ------------------------------------------------------------------------------------------------ optimisation
NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "norm", "bias")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Parameters excluded from weight decay: flagged `_no_weight_decay`, SSM A_log/D/dt_bias, norms, biases."""
    if getattr(param, "_no_weight_decay", False):
        return True
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("A_log", "D", "dt_bias", "bias"):
        return True
    return "norm" in name.lower() or param.ndim < 2


def param_groups(named_params, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in named_params if p.requires_grad]
    if not weight_decay:
        return [{"params": [p for _, p in named], "weight_decay": 0.0}]
    decay = [p for n, p in named if not no_weight_decay(n, p)]
    skip = [p for n, p in named if no_weight_decay(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | None = None,
                  warmup_ratio: float = 0.0, min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the base LR, then cosine decay to `min_lr_ratio` x base at `total_steps`
    (METHOD §4b: to 0). `warmup_steps` wins over `warmup_ratio` (a fraction of the total)."""
    total = max(1, int(total_steps))
    warm = int(warmup_steps) if warmup_steps is not None else int(math.ceil(warmup_ratio * total))
    warm = min(warm, total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)  # > 0 at step 0, so the first update is not wasted
        progress = (step - warm) / max(1, total - warm)
        progress = min(1.0, progress)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def prepare_trained(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """A model every parameter of which trains (KD's hybrid, DPO's policy): train mode, gradients on, activation
    checkpointing if asked."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ------------------------------------------------------------------------------------------------ sharded students
def zero_stage(trainer: pl.Trainer | None) -> int:
    """The DeepSpeed ZeRO stage of the trainer's strategy (0 when it is not DeepSpeed). Readable before `fit`."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DeepSpeedStrategy):
        return 0
    return int(((strategy.config or {}).get("zero_optimization") or {}).get("stage", 0))


@dataclasses.dataclass
class StudentSpec:
    """A student that comes to exist in the module's `configure_model` (DESIGN §5).

    `full` is the whole student with its starting weights, built by the runner before `fit` on every rank when
    the strategy does not shard parameters, and on rank 0 alone under ZeRO-3 (None on the others: they never
    hold it). Under ZeRO-3 `configure_model` runs inside `deepspeed.zero.Init`: an empty student of `config` is
    created already partitioned, then filled from rank 0's `full` one decoder layer at a time. `full=None`
    everywhere means random init (benchmarks): the model's own init, applied gathered unit by unit when sharded.
    """
    config: Any
    full: nn.Module | None = None
    random: bool = False  # no starting weights anywhere: the model's own random init
    created: str | None = None  # how materialise made it: "whole" or "sharded" (created partitioned)

    def materialise(self, trainer: pl.Trainer) -> nn.Module:
        from zebra.model.modeling_zebra import ZebraForCausalLM
        from zebra.stages import zero

        if zero_stage(trainer) != 3:
            student = ZebraForCausalLM(self.config) if self.random else self.full
            if student is None:
                raise StageError("the student's starting weights were not built on this rank")
            self.full, self.created = None, "whole"
            return student
        rank = trainer.global_rank
        student = ZebraForCausalLM(self.config)  # partitioned as it is created (zero.Init is active)
        if not zero.partitioned(student):
            raise StageError("ZeRO-3: the student was not created partitioned (configure_model must run under "
                             "deepspeed.zero.Init)")
        if self.random:
            zero.init_weights(student, rank)
        else:
            if rank == 0 and self.full is None:
                raise StageError("ZeRO-3: rank 0 has no starting weights for the student")
            zero.load_state(student, self.full.state_dict() if self.full is not None else None, rank)
        self.full, self.created = None, "sharded"  # rank 0's CPU copy is no longer needed
        # zero.Init places parameters on the GPU and DeepSpeed then leaves the module where it is, so the buffers
        # (MLA's RoPE inverse frequencies) must be moved by hand
        device = trainer.strategy.root_device
        for module in student.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
        return student


# ------------------------------------------------------------------------------------------------ Lightning module
class StageModule(pl.LightningModule):
    """Base of the training stages: optimiser/scheduler from `_partial_` configs, a finite-loss guard, token
    counting and the FLOPs/token estimate the throughput callback reads.

    Frozen models (teachers, DPO reference) are kept out of the module's registered children (see `frozen`), so
    they are never saved in checkpoints nor handed to DDP/ZeRO as parameters.
    """

    def __init__(self, optimizer: Callable | None = None, scheduler: Callable | None = None,
                 check_weights_moved: bool = False):
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.check_weights_moved = bool(check_weights_moved)
        self._start_state: dict | None = None
        self.weights_moved: dict | None = None
        self._frozen: dict[str, nn.Module] = {}
        # "replicated": each rank holds whole frozen models (bf16 on GPUs); "zero3": partitioned over the ranks in
        # their own ZeRO-3 inference engines (zebra.stages.zero.inference_engine), set by the runners from
        # `teacher_placement`
        self.frozen_placement = "replicated"
        self._frozen_engines: dict[str, Any] = {}
        self.tokens_seen = 0  # real (non-pad) tokens, summed over ranks' batches on this rank
        self.last_step_tokens = 0
        self.loss_history: list[float] = []

    # frozen models live in a plain dict: not registered, not in state_dict, moved to the device by hand
    def add_frozen(self, name: str, module: nn.Module) -> None:
        self._frozen[name] = freeze(module)

    def frozen(self, name: str) -> nn.Module:
        return self._frozen[name]

    def on_fit_start(self) -> None:
        self._place_frozen(partition=self.frozen_placement == "zero3" and self.trainer.world_size > 1)

    def _place_frozen(self, partition: bool) -> None:
        """Frozen models onto this rank's device, or (`partition`) each into its own ZeRO-3 inference engine;
        models already in an engine stay there."""
        for name, m in self._frozen.items():
            if name in self._frozen_engines:
                continue
            if partition:
                from zebra.stages import zero

                self._frozen_engines[name] = zero.inference_engine(m, self.device, next(m.parameters()).dtype)
            else:
                m.to(self.device)

    # -------------------------------------------------------------------------------------- the trained model
    def adopt_trained(self, model: nn.Module | StudentSpec, gradient_checkpointing: bool = False) -> nn.Module | None:
        """The model a stage trains in full (KD's hybrid, DPO's policy). Given whole, it is made ready and returned;
        a `StudentSpec` is kept for `materialise_trained` (from configure_model) and None is returned."""
        self.spec = model if isinstance(model, StudentSpec) else None
        self.gradient_checkpointing = gradient_checkpointing
        return None if self.spec is not None else prepare_trained(model, gradient_checkpointing)

    def materialise_trained(self, model: nn.Module | None) -> nn.Module:
        """From configure_model: `model` when it was given whole, else the spec's (created sharded under ZeRO-3)."""
        if model is not None:
            return model
        return prepare_trained(self.spec.materialise(self.trainer), self.gradient_checkpointing)

    def trained_config(self, model: nn.Module | None):
        """The trained model's config, also before configure_model has created it."""
        return model.config if model is not None else self.spec.config

    def register_with_engine(self, params: list[torch.nn.Parameter]) -> None:
        """Parameters a training step reads outside their own module's forward (an LM head weight in a chunked
        loss): under ZeRO-3 the engine's root module gathers them for the step and reduces their gradients
        (zebra.stages.zero.register_external; a no-op otherwise). Call from on_train_start."""
        from zebra.stages import zero

        engine = self.trainer.strategy.model
        zero.register_external(getattr(engine, "module", engine), params)

    # -------------------------------------------------------------------------------------- weights moved
    def on_train_start(self) -> None:
        if self.check_weights_moved:  # collective under ZeRO-3: every rank gathers, rank 0 keeps a CPU copy
            self._start_state = self._trainable_state()

    def on_train_end(self) -> None:
        if not self.check_weights_moved:
            return
        after = self._trainable_state()
        if after is not None and self._start_state is not None:
            self.weights_moved = dict(weights_moved(self._start_state, after), compared=self._moved_source)
            if self.weights_moved["unchanged"]:
                msg = (f"{type(self).__name__}: {len(self.weights_moved['unchanged'])} trained tensors never changed "
                       f"(e.g. {self.weights_moved['unchanged'][:3]}): their gradients never reached the optimizer")
                warnings.warn(msg)
                log.warning(msg)
        self._start_state = None

    def _trainable_state(self) -> dict | None:
        """CPU copies of the trained tensors on rank 0 (None elsewhere): DeepSpeed's fp32 master weights where
        its optimiser holds them (the bf16 module copies of weights near 1.0 may not move for many steps), else
        the module's parameters, gathered from ZeRO-3 shards. Collective."""
        from zebra.stages import zero

        rank = self.trainer.global_rank
        trained = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        available, master = zero.master_state_cpu(trained, rank)
        self._moved_source = "fp32 master weights" if available else "module parameters"
        if available:
            return master
        names = {n for n, _ in trained}
        state = zero.state_dict_cpu(self, rank, dtype=torch.float32)
        return None if state is None else {n: t for n, t in state.items() if n in names}

    def on_validation_start(self) -> None:
        self._place_frozen(partition=False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self, "_frozen", {}).values():
            m.eval()
        return self

    def check_finite(self, loss: torch.Tensor, what: str = "loss") -> None:
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"non-finite training {what} ({loss.detach().float().item()}) at step {self.global_step} of stage "
                f"{type(self).__name__}; stopping without export (lower the learning rate, check the data, or use "
                "fp32/bf16 instead of fp16)")

    def token_denominator(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global batch's tokens: the all-reduced count / world size (the count itself
        on one process or outside training). Dividing a rank's summed per-token loss by it makes the data-
        parallel mean of the ranks' gradients the gradient of the global batch's per-token mean, however the
        real tokens (padding) are spread over the ranks."""
        local = local.detach().float()
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1 or not self.training:
            return local.clamp_min(1.0)
        total = trainer.strategy.reduce(local.clone(), reduce_op="sum")
        return (total / trainer.world_size).clamp_min(1.0)

    def count_tokens(self, batch: dict, key: str = "attention_mask", ids_key: str = "input_ids") -> int:
        m = batch.get(key)
        n = int(m.sum()) if m is not None else batch[ids_key].numel()
        self.last_step_tokens = n
        self.tokens_seen += n
        return n

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            return None
        wd = float(getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0) or 0.0)
        groups = param_groups(self.trainable_named_parameters(), wd)
        if not any(g["params"] for g in groups):
            raise StageError(f"{type(self).__name__}: nothing to train (every parameter is frozen)")
        opt = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return opt
        total = self.trainer.estimated_stepping_batches if self.trainer.max_steps in (-1, None) else \
            self.trainer.max_steps
        sched = self.scheduler_factory(opt, total_steps=int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def flops_per_token(self) -> float:
        """Training FLOPs per token (fwd + bwd), for MFU: 6 x trained parameters here; the stages count their
        step from the layer definitions (zebra.plan.flops)."""
        return 6.0 * count_params(self, trainable_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["zebra"] = {"tokens_seen": self.tokens_seen, "loss_history": list(self.loss_history)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("zebra", {})
        self.tokens_seen = int(extra.get("tokens_seen", 0))
        self.loss_history = list(extra.get("loss_history", []))


# ------------------------------------------------------------------------------------------------ callbacks
def default_peak_flops(device: torch.device | str | None = None) -> float:
    """Dense bf16 peak of known GPUs; CPUs get a nominal 50 GFLOP/s per core (MFU there is only indicative)."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device)).lower()
        # H100/H200: the bf16 matmul rate measured on the lent cards (benchmarks.training), not the 989 spec
        for key, peak in (("h200", 790e12), ("h100", 790e12), ("a100", 312e12), ("l40", 181e12),
                          ("a10", 125e12), ("4090", 165e12), ("v100", 125e12)):
            if key in name:
                return peak
        return 100e12
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 50e9 * min(cores, torch.get_num_threads())


class ThroughputMonitor(pl.Callback):
    """Logs tokens/s and MFU every step (FLOPs per token from the module's `flops_per_token()`).

    A step's time runs from the end of the previous micro-batch to the end of this one (data loading and the
    optimizer included): GPU work is asynchronous, so only end-to-end intervals between the points where the
    host waits for it (the logged loss) measure the device, not a start/end pair around one batch."""

    def __init__(self, peak_flops: float | None = None, log_every_n_steps: int = 1):
        self.peak_flops = peak_flops
        self.every = max(1, int(log_every_n_steps))
        self._t_last = None
        self._fpt = None

    def on_train_start(self, trainer, module):
        self._fpt = float(module.flops_per_token()) if hasattr(module, "flops_per_token") else None
        if self.peak_flops is None:
            self.peak_flops = default_peak_flops(module.device)
        self._t_last = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        dt, self._t_last = now - (self._t_last or now), now
        tokens = getattr(module, "last_step_tokens", 0) * trainer.world_size
        if tokens and dt > 0 and trainer.global_step % self.every == 0:
            tps = tokens / dt
            metrics = {"perf/tokens_per_s": tps}
            if self._fpt:
                metrics["perf/mfu"] = tps * self._fpt / (self.peak_flops * trainer.world_size)
            module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=True, logger=True, batch_size=1)


class CheckpointDiskSpace(pl.Callback):
    """Warns at the start of training when the planned checkpoints would not fit the free disk."""

    def __init__(self, dirpath: str, keep: int = 1, weights_only: bool = False):
        self.dirpath, self.keep, self.weights_only = dirpath, max(1, keep), weights_only

    def estimate_bytes(self, module: nn.Module) -> int:
        size = sum(t.numel() * t.element_size() for t in module.state_dict().values() if torch.is_tensor(t))
        if not self.weights_only:  # AdamW: two fp32 moments per trainable parameter
            size += sum(2 * 4 * p.numel() for p in module.parameters() if p.requires_grad)
        return int(size)

    def on_train_start(self, trainer, module):
        if trainer.global_rank != 0:
            return
        need = self.estimate_bytes(module) * (self.keep + 1)  # + the one being written before the oldest goes
        path = Path(self.dirpath)
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if need > free:
            msg = (f"checkpoints under {path} will need ~{need / 2**30:.1f} GiB ({self.keep} kept + last) but only "
                   f"{free / 2**30:.1f} GiB are free; lower checkpoint.keep or use weights-only checkpoints")
            warnings.warn(msg)
            log.warning(msg)


class StopAtStep(pl.Callback):
    """Simulates a crash at a given global step (raises before that step runs), for resume tests and drills."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise KilledForTest(f"simulated kill at step {trainer.global_step}")


class KilledForTest(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ trainer
def build_loggers(cfg: DictConfig, stage: str, stage_dir: Path) -> list:
    loggers = []
    for key, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None or "_target_" not in lcfg:
            continue
        target = lcfg._target_
        kwargs = {}
        if target.endswith("WandbLogger"):
            kwargs["name"] = lcfg.get("name") or f"{cfg.model.name}-{stage}"
            kwargs["group"] = lcfg.get("group") or f"{cfg.model.name}"
            kwargs["save_dir"] = lcfg.get("save_dir") or str(stage_dir)
        elif target.endswith("CSVLogger"):
            kwargs["save_dir"] = lcfg.get("save_dir") or str(stage_dir)
            kwargs["name"] = lcfg.get("name") or "csv"
        elif target.endswith("TensorBoardLogger"):
            kwargs["save_dir"] = lcfg.get("save_dir") or str(stage_dir)
        loggers.append(instantiate(lcfg, **kwargs))
    return loggers


def build_strategy(scfg):
    if scfg is None:
        return "auto"
    if "_target_" in scfg:
        return instantiate(scfg)
    return scfg.get("name", "auto")


def build_trainer(cfg: DictConfig, stage: str, stage_dir: Path, max_steps: int, stage_cfg: DictConfig,
                  extra_callbacks: list | None = None, ckpt_dir: Path | None = None, **overrides) -> pl.Trainer:
    """The Lightning Trainer of one stage: `cfg.trainer` (instantiated), the stage's step budget, checkpoints under
    `<stage_dir>/checkpoints` (retention + last), throughput/MFU and disk-space callbacks, the loggers."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    ckpt_cfg = cfg.get("checkpoint") or {}
    ckpt_dir = ckpt_dir or stage_dir / "checkpoints"
    every = int(stage_cfg.get("checkpoint_every_n_steps") or ckpt_cfg.get("every_n_steps") or 0)
    keep = int(ckpt_cfg.get("keep", 2))
    weights_only = bool(ckpt_cfg.get("weights_only", False))
    callbacks = []
    if every > 0:
        # newest `keep` step checkpoints (monitoring the step), and last.ckpt as a link to the newest: no copy
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                                         every_n_train_steps=every, save_last="link", save_top_k=keep,
                                         monitor="train/global_step", mode="max", save_weights_only=weights_only))
        callbacks.append(CheckpointDiskSpace(str(ckpt_dir), keep=keep, weights_only=weights_only))
    perf = cfg.get("perf") or {}
    callbacks.append(ThroughputMonitor(peak_flops=perf.get("peak_flops"),
                                       log_every_n_steps=int(cfg.trainer.get("log_every_n_steps", 1) or 1)))
    for cb in (cfg.get("callbacks") or {}).values():
        if cb is not None and "_target_" in cb:
            callbacks.append(instantiate(cb))
    callbacks.extend(extra_callbacks or [])
    loggers = build_loggers(cfg, stage, stage_dir)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return instantiate(cfg.trainer, max_steps=int(max_steps), callbacks=callbacks, logger=loggers or False,
                       strategy=build_strategy(cfg.get("strategy")), default_root_dir=str(stage_dir),
                       enable_checkpointing=every > 0, **overrides)


def drop_checkpoints(cfg: DictConfig, trainer: pl.Trainer | None, ckpt_dir: Path) -> None:
    """With `checkpoint.keep_after_stage: false`, remove a finished stage's checkpoints (rank 0, after its export
    and report are written): its result is the export, and the smoke recipe's checkpoints would otherwise take
    ~6 GB of disk."""
    if (cfg.get("checkpoint") or {}).get("keep_after_stage", True):
        return
    if trainer is not None and trainer.global_rank != 0:
        return
    if Path(ckpt_dir).exists():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        log.info("checkpoint.keep_after_stage=false: removed %s", ckpt_dir)


def resolve_ckpt_path(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """`ckpt_path=last` resumes from `<ckpt_dir>/last.ckpt` when it exists (a fresh start otherwise, so a
    requeued job that never reached a checkpoint just starts); any other value is a path."""
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, "", "none", "null"):
        return None
    # a file, or under DeepSpeed a directory of per-rank shards (last.ckpt links to either)
    if ckpt == "last":
        last = Path(ckpt_dir) / "last.ckpt"
        if last.exists():
            return str(last)
        log.info("ckpt_path=last but %s does not exist: starting fresh", last)
        return None
    if not Path(ckpt).exists():
        raise StageError(f"ckpt_path {ckpt!r} does not exist")
    return str(ckpt)


def fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule, ckpt_path: str | None) -> None:
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_loggers(trainer)
    if trainer.interrupted:
        raise StageError("training was interrupted; no export written (resume with ckpt_path=last)")
    restore_placement(trainer, module)


def restore_placement(trainer: pl.Trainer, module: nn.Module) -> None:
    """Put the trained module back where it trained. Lightning's teardown at the end of `fit` moves it to the
    CPU; the export, its probe forward and the KD held-out pass after fit expect it on the training device.
    Under ZeRO-3 the partitions (`ds_tensor`) never left the GPU, but the buffers (MLA's RoPE inverse
    frequencies) and the persistent small parameters did: a probe forward then mixed CUDA activations with CPU
    tensors."""
    from zebra.stages import zero

    device = trainer.strategy.root_device
    if device.type == "cpu":
        return
    if not zero.partitioned(module):
        module.to(device)
        return
    # Small parameters below DeepSpeed's persistence threshold (norm weights) are held whole by every rank in
    # `param.data`, which the teardown moved too; the others' `data` are empty placeholders (free to move).
    for p in module.parameters():
        if p.data.device != device:
            p.data = p.data.to(device)
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)


def finish_loggers(trainer: pl.Trainer) -> None:
    """Close each stage's wandb run, so the next stage of a pipeline gets a run of its own."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            try:
                lg.experiment.finish()
            except Exception as err:  # never let logging break a finished training run
                log.warning("could not finish the wandb run: %s", err)


# ------------------------------------------------------------------------------------------------ run helpers
def teacher_placement(cfg: DictConfig, trainer: pl.Trainer | None) -> str:
    """`teacher_placement` checked: "replicated" or "zero3" (the latter only with a DeepSpeed strategy, whose
    process group the teacher's engine joins)."""
    placement = str(cfg.get("teacher_placement") or "replicated")
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
    name = cfg.get("teacher_dtype", "auto")
    if name in (None, "auto"):
        acc = str(cfg.trainer.get("accelerator", "cpu"))
        return torch.bfloat16 if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()) \
            else torch.float32
    return torch_dtype(name)


def build_token_data(cfg: DictConfig, tokenizer, split: str, seq_len: int, batch_size: int,
                     max_tokens: int | None = None, assistant_only: bool = False):
    """The token-mixture DataModule of `cfg.data.sft` for one stage's split and shapes."""
    if cfg.data.get("sft") is None:
        raise StageError(f"data config {cfg.data.get('name')!r} has no `sft` (token mixture) section")
    return instantiate_plain(cfg.data.sft, tokenizer=tokenizer, split=split, seq_len=int(seq_len),
                             batch_size=int(batch_size), max_tokens=max_tokens, assistant_only=bool(assistant_only))


def instantiate_plain(node, **kwargs):
    """hydra.utils.instantiate, but an error raised by the target's constructor (a missing data file, a bad
    field) surfaces as itself rather than wrapped in Hydra's InstantiationException."""
    from hydra.errors import InstantiationException

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:
            raise err.__cause__ from None
        raise


def prepare_token_data(cfg: DictConfig, tokenizer, split: str, seq_len: int, batch_size: int, world_size: int,
                       max_tokens: int | None = None, assistant_only: bool = False):
    """`build_token_data`, set up and checked (paths, emptiness, at least one global batch) before any model
    is loaded, so bad data fails in seconds with the data module's message."""
    dm = build_token_data(cfg, tokenizer, split, seq_len, batch_size, max_tokens, assistant_only)
    dm.setup()
    dm.num_batches(world_size)
    return dm


def plan_token_stage(cfg: DictConfig, sc: DictConfig, tokenizer, trainer, assistant_only: bool = False):
    """(steps, data module) of a token-mixture stage. Budget, first that is set: `max_steps`, `tokens` (rows of
    seq_len tokens; steps = ceil(tokens / (seq_len * batch_size * accumulate * world))), `epochs` (passes over the
    split). Sets the trainer's max_steps; the data module is checked before any model loads."""
    world = trainer.world_size
    accumulate = int(sc.get("accumulate_grad_batches", 1) or 1)
    unit = int(sc.seq_len) * int(sc.batch_size) * accumulate * world
    if sc.get("max_steps"):
        steps = int(sc.max_steps)
    elif sc.get("tokens"):
        steps = max(1, math.ceil(int(sc.tokens) / unit))
    elif sc.get("epochs"):
        steps = None
    else:
        raise StageError("set one of max_steps, tokens or epochs for the stage's budget")
    if steps is not None:
        dm = prepare_token_data(cfg, tokenizer, sc.split, sc.seq_len, sc.batch_size, world,
                                max_tokens=steps * unit, assistant_only=assistant_only)
    else:  # one Lightning epoch = one pass over the split; the row stream continues into further passes
        dm = prepare_token_data(cfg, tokenizer, sc.split, sc.seq_len, sc.batch_size, world,
                                assistant_only=assistant_only)
        steps = max(1, math.ceil(float(sc.epochs) * dm.num_batches(world) / accumulate))
    trainer.fit_loop.epoch_loop.max_steps = steps
    return steps, dm


# ------------------------------------------------------------------------------------------------ exports
def atomic_dir(dst: Path | str, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a temporary sibling of `dst`, then rename it into place (zebra.utils.files.atomic_dir)."""
    with files.atomic_dir(dst) as tmp:
        write(tmp)
    return Path(dst)


write_json_atomic = files.write_json_atomic


def read_json(path: Path | str) -> dict:
    with open(path) as f:
        return json.load(f)


def model_card(*, title: str, stage: str, model, base: str, teacher: str, teacher_quantisation: str, data: str,
               tokens: int, extra: dict | None = None) -> str:
    cfg = model.config
    layers = list(getattr(cfg, "layer_types", []))
    mla = [i for i, t in enumerate(layers) if t == "mla"]
    lines = [
        "---", "library_name: transformers", "tags: [zebra, hybrid, mla, mamba2, distillation]", "---", "",
        f"# {title}", "",
        f"Produced by the `{stage}` stage of zebra (MLA + Mamba2 hybrid distilled from a Llama base; "
        "Zebra-Llama, arXiv 2505.17272).", "",
        "| | |", "|---|---|",
        f"| layers | {len(layers)} ({len(mla)} MLA, {len(layers) - len(mla)} Mamba2) |",
        f"| MLA layers | {mla} |",
        f"| layer types | {' '.join('A' if t == 'mla' else 'M' for t in layers)} |",
        f"| KV cache vs base | {100 * kv_fraction(cfg):.3f}% |",
        f"| parameters | {count_params(model):,} |",
        f"| base | {base} |",
        f"| teacher | {teacher} |",
        f"| teacher weights quantised | {teacher_quantisation} |",
        f"| data | {data} |",
        f"| tokens trained in this stage | {tokens:,} |",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"| {k} | {v} |")
    if teacher_quantisation not in ("none",) and not teacher_quantisation.startswith("none"):
        lines += ["", f"Every number for this model was measured against a quantised teacher ({teacher_quantisation})."]
    lines += ["", "Load with `import zebra; AutoModelForCausalLM.from_pretrained(path)`.", ""]
    return "\n".join(lines)


def export_to(model, tokenizer, directory: Path | str, card: str) -> None:
    """Hugging Face export (safetensors, config, tokenizer, model card and the model code for
    trust_remote_code) into `directory`."""
    export.write_hf_model(model, directory, tokenizer, card)


def export_model(model, tokenizer, dst: Path | str, card: str) -> Path:
    """`export_to`, written atomically: a temporary sibling renamed into place, never a partial `dst`."""
    return export.save_hf_model(model, dst, tokenizer, card)


def export_stage_model(cfg: DictConfig, trainer: pl.Trainer | None, model, tokenizer, dst: Path | str, card: str,
                       probe: dict | None = None) -> dict | None:
    """Write a stage's trained model to `dst` (atomically) as a Hugging Face directory; returns the export
    check (below) on rank 0, None elsewhere or when it is off.

    Collective: every rank must call it. Under ZeRO-3 the shards are gathered one decoder layer at a time into a
    CPU state dict on rank 0 (zebra.stages.zero), which writes the export from that; other strategies export the
    model as it is. With `export_check: true` the export is loaded back with `from_pretrained` (dtype and device
    of the in-memory model) and its logits on a probe batch are compared with the in-memory model's.
    """
    if not cfg.get("export", True):
        log.info("export=false: no model export written to %s", dst)
        return None
    to_save = exportable(trainer, model)
    reference = probe_reference(cfg, model, probe)
    if to_save is None:
        return None
    export_model(to_save, tokenizer, dst, card)
    del to_save
    return compare_export(dst, *reference, model) if reference is not None else None


def exportable(trainer: pl.Trainer | None, model):
    """The model to write, on rank 0 (None elsewhere): under ZeRO-3 a CPU copy gathered from the shards one
    decoder layer at a time (zebra.stages.zero), else the model itself. Collective: every rank must call it."""
    from zebra.stages import zero

    rank = trainer.global_rank if trainer is not None else 0
    if not zero.partitioned(model):
        return model if rank == 0 else None
    state = zero.state_dict_cpu(model, rank)
    return zero.consolidated_model(model, state) if rank == 0 else None


def probe_reference(cfg: DictConfig, model, probe: dict | None = None):
    """(probe ids, the in-memory model's logits on them) when `export_check` is on, else None. Collective."""
    if not cfg.get("export_check"):
        return None
    ids = probe_ids(probe, model.config.vocab_size)
    return ids, model_logits(model, ids)


def probe_ids(batch: dict | None, vocab_size: int, length: int = 128) -> torch.Tensor:
    """The first row of `batch` (at most `length` tokens), else a fixed id sequence."""
    if batch is not None:
        return batch["input_ids"][:1, :length].clone()
    return (torch.arange(length) * 7919 % vocab_size)[None]


def model_device(model) -> torch.device:
    """Where `model` computes: its partitions' device under ZeRO-3 (the parameters themselves are empty
    placeholders there), else its embedding's."""
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.device
        break
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def model_logits(model, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(input_ids=ids.to(model_device(model)), use_cache=False).logits.float().cpu()
    finally:
        model.train(was)


def param_dtypes(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}


def compare_export(dst: Path | str, ids: torch.Tensor, reference: torch.Tensor, model) -> dict:
    """Load the export at `dst` with `from_pretrained` and compare its logits on `ids` with `reference` (the
    in-memory model's).

    The loaded copy is given the in-memory model's dtype of every tensor, so that both compute alike: a
    mixed-precision run holds its trained weights in fp32 beside bf16 frozen ones (DeepSpeed's ZeRO-1/2 casts
    only the frozen parameters to bf16), which no single `dtype=` reproduces. `equal` is bitwise equality;
    `match` allows the rounding of one dtype conversion (1e-3 of the logits' scale) with identical argmax."""
    from transformers import AutoModelForCausalLM

    dtypes = param_dtypes(model)

    def as_in_memory(m):
        with torch.no_grad():
            for name, p in m.named_parameters(remove_duplicate=False):
                if name in dtypes and p.dtype != dtypes[name]:
                    p.data = p.data.to(dtypes[name])
        return m

    # read in fp32 on the CPU, cast tensor by tensor, then moved (the GPU never holds an fp32 copy of a bf16
    # model); cast again after the move, whose module hooks keep the SSM parameters in >= fp32
    loaded = as_in_memory(as_in_memory(AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32))
                          .to(model_device(model)))
    logits = model_logits(loaded, ids)
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    diff = (logits - reference).abs()
    counts: dict[str, int] = {}
    for dt in dtypes.values():
        key = str(dt).replace("torch.", "")
        counts[key] = counts.get(key, 0) + 1
    out = {"tokens": int(ids.numel()), "dtype": max(counts, key=counts.get), "tensor_dtypes": counts,
           "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "reference_abs_max": float(reference.abs().max()),
           "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
           "equal": bool(torch.equal(logits, reference))}
    out["match"] = out["equal"] or (out["argmax_agreement"] == 1.0
                                    and out["max_abs_diff"] <= 1e-3 * max(1.0, out["reference_abs_max"]))
    return out


def dataset_description(data_cfg, key: str) -> str:
    """`<data name>: <source paths / hub names>` for model cards."""
    if data_cfg is None:
        return "?"
    name = str(data_cfg.get("name", "?"))
    node = data_cfg.get(key)
    if node is None:
        return name
    srcs = node.get("sources") or node.get("source") or []
    if not isinstance(srcs, (list, tuple)) and not OmegaConf.is_list(srcs):
        srcs = [srcs]
    names = [str(s.get("path") or s.get("name")) if hasattr(s, "get") else str(s) for s in srcs]
    return f"{name}: " + ", ".join(names) if names else name


def weights_moved(before: dict, after: dict) -> dict:
    """How many elements of each tensor changed between two state dicts (the ZeRO-3 trap leaves whole tensors
    untouched)."""
    moved = {n: float((after[n] != before[n]).float().mean()) for n in before if n in after}
    return {"tensors": len(moved), "unchanged": sorted(n for n, f in moved.items() if f == 0.0),
            "min_moved_fraction": min(moved.values()) if moved else None,
            "mean_moved_fraction": sum(moved.values()) / len(moved) if moved else None}


def stage_summary(trainer: pl.Trainer | None, module: StageModule | None, wall: float) -> dict:
    hist = list(getattr(module, "loss_history", []) or [])
    return {
        "steps": int(trainer.global_step) if trainer is not None else 0,
        # real tokens of this rank's batches x ranks (ranks see equally long packed rows)
        "tokens_seen": int(getattr(module, "tokens_seen", 0)) * (trainer.world_size if trainer is not None else 1),
        "wall_seconds": round(wall, 2),
        "loss_first": hist[0] if hist else None,
        "loss_last": hist[-1] if hist else None,
        "loss_history": hist,
        **({"weights_moved": module.weights_moved} if getattr(module, "weights_moved", None) else {}),
    }
