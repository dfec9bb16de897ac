"""Stage `kd`: end-to-end knowledge distillation of the assembled hybrid (METHOD §6).

The hybrid takes each whole decoder layer from the ILD'd student of its kind, MLA at the mix's positions
(`smart`: SMART's selection from smart/sensitivity.json; `uniform`: floor(i*L/n); `explicit`: the list). The
teacher `model.kd_teacher` is frozen and gets the students' packed masking. The loss is forward
KL(p_teacher || p_student) from the two models' final hidden states and LM-head weights, chunked over tokens
so full-vocabulary logits are never materialised (zebra.stages.losses.chunked_kd_loss). With
`kd.teacher_source=cache` no teacher is loaded: each batch carries the teacher's stored top-k log-probs
(zebra.stages.teacher_cache) and the loss is their sparse form (zebra.stages.losses.sparse_kd_loss).
"""

from __future__ import annotations

import logging
import time

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from zebra.eval.metrics import heldout_kl
from zebra.plan.describe import count_parameters
from zebra.stages import artifacts, teacher_cache, zero
from zebra.stages.budget import plan_token_stage, world_size
from zebra.stages.errors import MissingArtifactError, StageError, TokenizerMismatchError
from zebra.stages.losses import chunked_kd_loss, lm_head_weight, sparse_kd_loss
from zebra.stages.module import StageModule, StudentSpec, stage_summary
from zebra.stages.teacher import (TeacherOutputs, check_tokenizers_match, load_model_tokenizer, load_teacher_model,
                                  teacher_device, teacher_dtype, teacher_forward, teacher_placement)
from zebra.stages.trainer import build_trainer, fit
from zebra.stages.zero import zero_stage

log = logging.getLogger("zebra.stages.kd")


def student_hidden(student: nn.Module, batch: dict) -> torch.Tensor:
    """Final (normed) hidden states of a ZebraForCausalLM on a packed batch; no logits."""
    return student.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state


def next_token_labels(batch: dict) -> torch.Tensor:
    """labels[t] = input_ids[t + 1] where loss_mask[t], else -100 (position t predicts the next token)."""
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels.masked_fill(~batch["loss_mask"].bool(), -100)


class KDModule(StageModule):
    """`student`: the hybrid itself, or a `StudentSpec` that `configure_model` turns into it (created sharded
    under ZeRO-3). `heldout`: batches on which the KL to the teacher is measured at the start and the end of
    training (`kl_before`, `kl_after`; every rank runs them, as a sharded student needs). `teacher` is None when
    the batches carry the teacher's cached top-k (kd.teacher_source=cache): there is no held-out KL then."""

    def __init__(self, student: nn.Module | StudentSpec, teacher: nn.Module | None, temperature: float = 1.0,
                 kl_weight: float = 1.0, ce_weight: float = 0.0, reduction: str = "sequence",
                 chunk_size: int | None = None, gradient_checkpointing: bool = False, seq_len: int = 0,
                 optimizer=None, scheduler=None, heldout: list | None = None, check_weights_moved: bool = False,
                 frozen_placement: str = "replicated"):
        super().__init__(optimizer, scheduler, check_weights_moved, frozen_placement)
        self.student = self.adopt_trained(student, gradient_checkpointing)  # every hybrid parameter trains in KD
        if teacher is not None:
            self.add_frozen("teacher", teacher)
        self.has_teacher = teacher is not None
        self.temperature, self.kl_weight, self.ce_weight = float(temperature), float(kl_weight), float(ce_weight)
        self.reduction, self.chunk_size, self.seq_len = reduction, chunk_size, seq_len
        self.heldout = list(heldout or [])
        self.kl_before: float | None = None
        self.kl_after: float | None = None

    def configure_model(self) -> None:
        self.student = self.materialise_trained(self.student)

    def measure_heldout(self) -> float | None:
        if not self.heldout or not self.has_teacher:
            return None
        with self.trainer.precision_plugin.forward_context():
            return heldout_kl(self.student, self.frozen("teacher"), self.heldout, self.chunk_size)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.register_with_engine([lm_head_weight(self.student)])  # the chunked loss reads it directly
        if self.kl_before is None:  # a resumed run keeps the value measured before its first step
            self.kl_before = self.measure_heldout()

    def on_train_end(self) -> None:
        super().on_train_end()
        self.kl_after = self.measure_heldout()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["zebra"]["kl_before"] = self.kl_before

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_before = checkpoint.get("zebra", {}).get("kl_before")

    def flops_per_token(self) -> float:
        """Teacher forward (body + logits in the loss) + student forward and backward (zebra.plan.flops)."""
        from zebra.plan.flops import kd_step_flops, training_flops_per_token

        config = self.trained_config(self.student)
        if not self.has_teacher:  # cached teacher: the student's step alone
            return training_flops_per_token(config, self.seq_len, lm_head=True)
        return kd_step_flops(config, self.frozen("teacher").config, self.seq_len)["total"]

    def kd_loss(self, batch: dict):
        if teacher_cache.IDS in batch:
            return self.kd_loss_from_cache(batch)
        t = teacher_forward(self.frozen("teacher"), batch["input_ids"], batch["position_ids"],
                                   batch.get("attention_mask"))
        return self.kd_loss_from_teacher(batch, t)

    def kd_loss_from_teacher(self, batch: dict, t: TeacherOutputs, after_student_forward=None):
        """The loss given the teacher's forward `t` (split from `kd_loss` so that benchmarks time the teacher on
        its own; `after_student_forward()` is called between the student's forward and the loss)."""
        hs = student_hidden(self.student, batch)
        if after_student_forward is not None:
            after_student_forward()
        teacher_head = lm_head_weight(self.frozen("teacher"))
        with zero.gathered([teacher_head]):  # a teacher partitioned in its own ZeRO-3 engine (no-op otherwise)
            return chunked_kd_loss(hs, t.last_hidden_state, lm_head_weight(self.student), teacher_head,
                                   **self.loss_options(batch))

    def kd_loss_from_cache(self, batch: dict):
        """The sparse loss over the teacher's stored top-k in the batch, and over its tail samples where the cache
        has them (zebra.stages.teacher_cache)."""
        hs = student_hidden(self.student, batch)
        return sparse_kd_loss(hs, lm_head_weight(self.student), batch[teacher_cache.IDS],
                              batch[teacher_cache.LOGPROBS], batch[teacher_cache.TAIL],
                              tail_ids=batch.get(teacher_cache.TAIL_IDS),
                              tail_logprobs=batch.get(teacher_cache.TAIL_LOGPROBS), **self.loss_options(batch))

    def loss_options(self, batch: dict) -> dict:
        """What both KD losses (online and from the cache) take from the batch and the module's hyper-parameters."""
        return dict(mask=batch["loss_mask"].bool(), labels=next_token_labels(batch) if self.ce_weight else None,
                    temperature=self.temperature, kl_weight=self.kl_weight, ce_weight=self.ce_weight,
                    reduction=self.reduction, num_sequences=batch["input_ids"].shape[0],
                    num_tokens=self.token_denominator(batch["loss_mask"].sum()) if self.reduction == "token" else None,
                    chunk_size=self.chunk_size)

    def training_step(self, batch, batch_idx):
        self.count_tokens(batch)
        loss, stats = self.kd_loss(batch)
        self.check_finite(loss)
        self.loss_history.append(float(loss.detach()))
        b = batch["input_ids"].shape[0]
        self.log_dict({"train/loss": loss.detach(), "train/kl_per_token": stats["kl"], "train/ce": stats["ce"],
                       "train/global_step": float(self.global_step)}, on_step=True, on_epoch=False, batch_size=b)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
        return loss


def mla_layers_for(cfg: DictConfig, num_layers: int) -> list[int]:
    """The mix's MLA layer indices (a `smart` mix reads SMART's selection)."""
    from zebra.plan.mixes import resolve_mla_layers

    try:
        return resolve_mla_layers(cfg.mix, num_layers, artifacts.output_path(cfg, "smart"))
    except FileNotFoundError as err:
        raise MissingArtifactError(str(err)) from err


def load_kd_teacher(cfg: DictConfig, student_tok, student_vocab: int, dtype: torch.dtype,
                    device: torch.device | str | None = None):
    """The KD teacher, after checking (from its tokenizer, before its weights) that it shares the student's
    tokenizer."""
    spec = str(cfg.model.kd_teacher)
    teacher_tok = load_model_tokenizer(cfg.model.tokenizer if spec.startswith("random:") else spec)
    check_tokenizers_match(student_tok, teacher_tok, "student", spec)
    base = cfg.model.base
    if spec.startswith("random:") and cfg.model.get("kd_teacher_base"):  # e.g. an 8B-shaped random teacher
        from zebra.plan.presets import preset_base

        base = preset_base(str(cfg.model.kd_teacher_base))
    teacher = load_teacher_model(spec, base, dtype=dtype, device=device)
    tv = teacher.model.get_output_embeddings().weight.shape[0]
    if tv != student_vocab:
        raise TokenizerMismatchError(
            f"teacher {spec!r} has {tv} LM-head rows but the student {student_vocab}: KD needs the same vocabulary")
    return teacher


def run(cfg: DictConfig) -> dict:
    """Assemble the hybrid from the ILD exports (or, `kd.student_init=random`, the model's own init at real shapes,
    for throughput runs), distil it into `model.kd_teacher`, export it. The module is `kd.module` (a KDModule,
    completed here with the student, the teacher and the held-out batches)."""
    from zebra.compose.students import assemble_hybrid, hybrid_config
    from zebra.plan.describe import zebra_config_from_preset
    from zebra.plan.mixes import layer_types_for

    sc = cfg.kd
    start = time.perf_counter()
    init, source = str(sc.student_init), str(sc.teacher_source)
    if init not in ("ilkd", "random"):
        raise StageError(f"kd.student_init must be 'ilkd' or 'random', got {init!r}")
    if source not in ("online", "cache"):
        raise StageError(f"kd.teacher_source must be 'online' or 'cache', got {source!r}")
    if init == "random":  # throughput / memory runs at real shapes: no ILD exports needed
        num_layers = int(cfg.model.base.num_hidden_layers)
        layers = mla_layers_for(cfg, num_layers)
        config = zebra_config_from_preset(cfg.model, layer_types_for(num_layers, layers))
        tokenizer = load_model_tokenizer(cfg.model.tokenizer)
    else:
        configs = {k: artifacts.load(cfg, "ilkd", "config", part=k) for k in ("mla", "mamba")}
        num_layers = configs["mla"].num_hidden_layers
        layers = mla_layers_for(cfg, num_layers)
        config = hybrid_config(configs["mla"], configs["mamba"], layers)
        tokenizer = artifacts.load(cfg, "ilkd", "tokenizer", part="mla")
    world = world_size(cfg)
    steps, dm = plan_token_stage(cfg, sc, tokenizer, world, assistant_only=sc.assistant_only)
    # the cache must match this run's data, tokenizer, shapes, temperature and k before the Trainer is built
    cache = teacher_cache.open_for_kd(cfg, dm, tokenizer, config.vocab_size) if source == "cache" else None
    ckpt_dir = artifacts.checkpoint_dir(cfg, "kd")
    trainer, ckpt = build_trainer(cfg, "kd", sc, steps, world, ckpt_dir)  # another config's checkpoint: refused
    if cache is not None:
        teacher, placement, quantisation, data = None, "none (cached top-k)", \
            cache.manifest["teacher_quantisation"], teacher_cache.CachedTeacherData(dm, cache)
    else:
        placement = teacher_placement(cfg, trainer)  # checked before any model loads
        # tokenizers must match before the teacher's weights load and long before training
        teacher = load_kd_teacher(cfg, tokenizer, config.vocab_size, teacher_dtype(cfg), teacher_device(trainer))
        quantisation, data = teacher.quantisation, dm
    # Under ZeRO-3 only rank 0 assembles the whole hybrid (on CPU); configure_model creates it sharded.
    spec = StudentSpec(config, random=init == "random")
    if init == "ilkd" and (zero_stage(trainer) != 3 or trainer.global_rank == 0):
        spec.full = assemble_hybrid(artifacts.load(cfg, "ilkd", part="mla"),
                                    artifacts.load(cfg, "ilkd", part="mamba"), layers)

    heldout = []
    if sc.heldout_batches > 0 and teacher is not None:  # the held-out KL needs the teacher itself
        for i, b in enumerate(dm.heldout_dataloader(batch_size=int(sc.batch_size))):
            if i >= int(sc.heldout_batches):
                break
            heldout.append(b)
    module = instantiate(sc.module)(student=spec, teacher=teacher.model if teacher is not None else None,
                                    heldout=heldout,
                                    frozen_placement=placement, check_weights_moved=cfg.check_weights_moved)
    fit(trainer, module, data, ckpt)
    hybrid = module.student
    # a run restored from a checkpoint at max_steps trains no step, and Lightning then skips on_train_end
    kl_before = module.kl_before
    kl_after = module.kl_after if module.kl_after is not None else module.measure_heldout()
    report = {"stage": "kd", "config_hash": artifacts.stage_hash(cfg, "kd"), "model": cfg.model.name,
              "mix": cfg.mix.name, "mla_layers": layers, "params": count_parameters(hybrid),
              "kv_fraction": artifacts.kv_fraction(hybrid.config), "teacher": str(cfg.model.kd_teacher),
              "teacher_quantisation": quantisation, "teacher_placement": placement,
              "teacher_partitioned": teacher is not None and zero.partitioned(teacher.model),
              "teacher_source": source, "teacher_cache": str(cache.dir) if cache is not None else None,
              "temperature": module.temperature,
              "ce_weight": module.ce_weight, "assistant_only": sc.assistant_only,
              "heldout_kl_before": kl_before, "heldout_kl_after": kl_after,
              **stage_summary(trainer, module, time.perf_counter() - start)}
    hybrid.eval()
    card = dict(title=f"zebra {cfg.model.name} {cfg.mix.name} hybrid after KD", stage="kd",
                base=str(cfg.model.teacher), teacher=str(cfg.model.kd_teacher),
                teacher_quantisation=quantisation,
                data=artifacts.dataset_description(cfg.data, "sft") + f" (split {sc.split})",
                tokens=module.tokens_seen,
                extra={"held-out KL to teacher (before -> after KD)":
                       f"{kl_before:.4f} -> {kl_after:.4f}" if kl_before is not None else "n/a"})
    # collective under ZeRO-3 (every rank gathers; rank 0 writes)
    report = artifacts.finish(cfg, "kd", trainer, report, model=hybrid, tokenizer=tokenizer, card=card,
                              probe=heldout[0] if heldout else None, checkpoints=ckpt_dir)
    log.info("kd done: %s", artifacts.stage_dir(cfg, "kd"))
    return report
