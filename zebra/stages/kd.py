"""Stage `kd`: end-to-end knowledge distillation of the assembled hybrid (METHOD §6).

The hybrid takes each whole decoder layer from the ILD'd student of its kind, MLA at the mix's positions
(`smart`: SMART's selection from smart/sensitivity.json; `uniform`: floor(i*L/n); `explicit`: the list). The
teacher `model.kd_teacher` is frozen and gets the students' packed masking. The loss is forward
KL(p_teacher || p_student) from the two models' final hidden states and LM-head weights, chunked over tokens
so full-vocabulary logits are never materialised (zebra.stages.losses.chunked_kd_loss).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from zebra.stages import common
from zebra.stages.common import StageModule
from zebra.stages.losses import chunked_kd_loss

log = logging.getLogger("zebra.stages.kd")


def next_token_labels(batch: dict) -> torch.Tensor:
    """labels[t] = input_ids[t + 1] where loss_mask[t], else -100 (position t predicts the next token)."""
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels.masked_fill(~batch["loss_mask"].bool(), -100)


class KDModule(StageModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 1.0, kl_weight: float = 1.0,
                 ce_weight: float = 0.0, reduction: str = "sequence", chunk_size: int | None = None,
                 gradient_checkpointing: bool = False, seq_len: int = 0, optimizer=None, scheduler=None):
        super().__init__(optimizer, scheduler)
        self.student = student
        self.add_frozen("teacher", teacher)
        self.temperature, self.kl_weight, self.ce_weight = float(temperature), float(kl_weight), float(ce_weight)
        self.reduction, self.chunk_size, self.seq_len = reduction, chunk_size, seq_len
        if gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def flops_per_token(self) -> float:
        return 3.0 * common.model_forward_flops_per_token(self.student, self.seq_len) + \
            common.model_forward_flops_per_token(self.frozen("teacher"), self.seq_len)

    def kd_loss(self, batch: dict, student: nn.Module | None = None):
        student = student or self.student
        teacher = self.frozen("teacher")
        t = common.teacher_forward(teacher, batch["input_ids"], batch["position_ids"], batch.get("attention_mask"))
        hs = common.student_hidden(student, batch)
        return chunked_kd_loss(hs, t.last_hidden_state, common.lm_head_weight(student), common.lm_head_weight(teacher),
                               mask=batch["loss_mask"].bool(),
                               labels=next_token_labels(batch) if self.ce_weight else None,
                               temperature=self.temperature, kl_weight=self.kl_weight, ce_weight=self.ce_weight,
                               reduction=self.reduction, num_sequences=batch["input_ids"].shape[0],
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


@torch.no_grad()
def heldout_kl(student: nn.Module, teacher: nn.Module, batches, chunk_size: int | None = None) -> float | None:
    """Mean per-token forward KL(teacher || student) over the counted positions of `batches`."""
    was = student.training
    student.eval()
    total, n = 0.0, 0
    try:
        for batch in batches:
            t = common.teacher_forward(teacher, batch["input_ids"], batch["position_ids"], batch.get("attention_mask"))
            hs = common.student_hidden(student, batch)
            _, stats = chunked_kd_loss(hs, t.last_hidden_state, common.lm_head_weight(student),
                                       common.lm_head_weight(teacher), mask=batch["loss_mask"].bool(),
                                       reduction="sum", chunk_size=chunk_size)
            k = int(stats["tokens"])
            total += float(stats["kl"]) * k
            n += k
    finally:
        student.train(was)
    return total / n if n else None


def mla_layers_for(cfg: DictConfig, num_layers: int) -> list[int]:
    from zebra.mixes import resolve_mla_layers

    smart_file = Path(cfg.paths.smart_dir) / "sensitivity.json"
    try:
        return resolve_mla_layers(cfg.mix, num_layers, smart_file)
    except FileNotFoundError as err:
        raise common.MissingArtifactError(str(err)) from err


def student_tokenizer(cfg: DictConfig):
    from transformers import AutoTokenizer

    path = Path(cfg.paths.ilkd_dir) / "mla" / "model"
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return common.load_model_tokenizer(cfg.model.tokenizer)


def load_kd_teacher(cfg: DictConfig, student_tok, student_vocab: int, dtype: torch.dtype):
    """The KD teacher, after checking (from its tokenizer, before its weights where possible) that it shares the
    student's tokenizer."""
    spec = str(cfg.model.kd_teacher)
    teacher_tok = None
    if spec.startswith("random:"):
        teacher_tok = common.load_model_tokenizer(cfg.model.tokenizer)
    elif not spec.endswith(".gguf"):
        teacher_tok = common.load_model_tokenizer(spec)
    if teacher_tok is not None:
        common.check_tokenizers_match(student_tok, teacher_tok, "student", spec)
    teacher = common.load_teacher_model(spec, cfg.model.base, dtype=dtype)
    if teacher_tok is None and teacher.tokenizer is not None:
        common.check_tokenizers_match(student_tok, teacher.tokenizer, "student", spec)
    tv = teacher.model.get_output_embeddings().weight.shape[0]
    if tv != student_vocab:
        raise common.TokenizerMismatchError(
            f"teacher {spec!r} has {tv} LM-head rows but the student {student_vocab}: KD needs the same vocabulary")
    return teacher


def run(cfg: DictConfig) -> dict:
    from zebra.compose.students import assemble_hybrid
    from zebra.stages.smart import load_ild_student

    sc = cfg.kd
    start = time.perf_counter()
    out_dir = Path(cfg.paths.kd_dir)
    mla = load_ild_student(cfg, "mla")
    mamba = load_ild_student(cfg, "mamba")
    num_layers = mla.config.num_hidden_layers
    layers = mla_layers_for(cfg, num_layers)
    tokenizer = student_tokenizer(cfg)
    trainer = common.build_trainer(cfg, "kd", out_dir, max_steps=1, stage_cfg=sc,
                                   accumulate_grad_batches=sc.get("accumulate_grad_batches", 1))
    steps, dm = common.plan_token_stage(cfg, sc, tokenizer, trainer, assistant_only=sc.assistant_only)
    # tokenizers must match before the teacher's weights load and long before training
    teacher = load_kd_teacher(cfg, tokenizer, mla.get_output_embeddings().weight.shape[0], common.teacher_dtype(cfg))
    hybrid = assemble_hybrid(mla, mamba, layers)
    del mla, mamba
    hybrid.train()
    for p in hybrid.parameters():
        p.requires_grad_(True)

    module = KDModule(hybrid, teacher.model, temperature=sc.temperature, kl_weight=sc.kl_weight,
                      ce_weight=sc.ce_weight, reduction=sc.reduction, chunk_size=sc.get("chunk_size"),
                      gradient_checkpointing=sc.gradient_checkpointing, seq_len=int(sc.seq_len),
                      optimizer=instantiate(sc.optimizer), scheduler=instantiate(sc.scheduler))
    heldout = []
    if int(sc.get("heldout_batches") or 0) > 0:
        for i, b in enumerate(dm.heldout_dataloader(batch_size=int(sc.batch_size))):
            if i >= int(sc.heldout_batches):
                break
            heldout.append(b)
    kl_before = heldout_kl(hybrid, teacher.model, heldout, sc.get("chunk_size")) if heldout else None
    common.fit(trainer, module, dm, common.resolve_ckpt_path(cfg, out_dir / "checkpoints"))
    kl_after = heldout_kl(hybrid, teacher.model, heldout, sc.get("chunk_size")) if heldout else None
    wall = time.perf_counter() - start

    report = {"stage": "kd", "config_hash": common.stage_hash("kd", cfg), "model": cfg.model.name,
              "mix": cfg.mix.name, "mla_layers": layers, "params": common.count_params(hybrid),
              "kv_fraction": common.kv_fraction(hybrid.config), "teacher": str(cfg.model.kd_teacher),
              "teacher_quantisation": teacher.quantisation, "temperature": sc.temperature,
              "ce_weight": sc.ce_weight, "assistant_only": sc.assistant_only,
              "heldout_kl_before": kl_before, "heldout_kl_after": kl_after,
              **common.stage_summary(trainer, module, wall)}
    if trainer.global_rank == 0:
        hybrid.eval()
        card = common.model_card(
            title=f"zebra {cfg.model.name} {cfg.mix.name} hybrid after KD", stage="kd", model=hybrid,
            base=str(cfg.model.teacher), teacher=str(cfg.model.kd_teacher),
            teacher_quantisation=teacher.quantisation,
            data=common.dataset_description(cfg.data, "sft") + f" (split {sc.split})", tokens=module.tokens_seen,
            extra={"held-out KL to teacher (before -> after KD)":
                   f"{kl_before:.4f} -> {kl_after:.4f}" if kl_before is not None else "n/a"})
        common.export_model(hybrid, tokenizer, out_dir / "model", card)
        common.write_json_atomic(out_dir / "report.json", report)
        log.info("kd done: %s", out_dir)
    return report
