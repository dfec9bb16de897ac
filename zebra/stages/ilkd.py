"""Stage `ilkd`: intermediate layer distillation of the all-MLA and all-Mamba2 students (METHOD §4).

One frozen teacher forward per step (the same-size base, with the students' block-causal mask and per-document
positions) gives every layer's input and output and, through forward hooks on `self_attn`, every attention
output. Each student layer l is run teacher-forced on the teacher's input of layer l; its loss is the mean over
real tokens of the un-squared L2 distance to the teacher's output of layer l, plus (`mixer_loss`) the same term
on the mixer output (after o_proj / out_proj, before the residual add), summed over layers and students.
Embeddings and LM head are frozen; the final norm trains only under `last_layer_target: normed`.
"""

from __future__ import annotations

import logging
import time

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from zebra.model.packing import doc_ids_from_position_ids, is_packed
from zebra.plan.describe import count_parameters
from zebra.stages import artifacts
from zebra.stages.budget import plan_token_stage, world_size
from zebra.stages.errors import StageError, TokenizerMismatchError
from zebra.stages.module import StageModule, StudentSpec, stage_summary
from zebra.stages.teacher import (load_model_tokenizer, load_teacher_model, teacher_dtype, teacher_forward,
                                  teacher_placement)
from zebra.stages.trainer import build_trainer, fit
from zebra.stages.zero import zero_stage

log = logging.getLogger("zebra.stages.ilkd")

KINDS = artifacts.STAGES["ilkd"].parts


def masked_l2(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
              tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over weighted tokens of ||a - b||_2 over the hidden dim (un-squared), in fp32. `tokens`: the
    denominator (default: this batch's weight sum; in training, this rank's share of the global batch's tokens)."""
    dist = (a.float() - b.float()).norm(dim=-1)
    return (dist * weight).sum() / (tokens if tokens is not None else weight.sum().clamp_min(1.0))


class ILDModule(StageModule):
    def __init__(self, students: dict[str, nn.Module], teacher: nn.Module, mixer_loss: bool = True,
                 mixer_loss_weight: float = 1.0, last_layer_target: str = "normed",
                 gradient_checkpointing: bool = False, seq_len: int = 0, optimizer=None, scheduler=None,
                 check_weights_moved: bool = False, frozen_placement: str = "replicated"):
        super().__init__(optimizer, scheduler, check_weights_moved, frozen_placement)
        if last_layer_target not in ("normed", "unnormed"):
            raise ValueError(f"ild last_layer_target must be 'normed' or 'unnormed', got {last_layer_target!r}")
        if not students:
            raise ValueError("ilkd needs at least one student")
        self.add_frozen("teacher", teacher)
        self.mixer_loss, self.mixer_loss_weight = bool(mixer_loss), float(mixer_loss_weight)
        self.last_layer_target = last_layer_target
        self.gradient_checkpointing = gradient_checkpointing
        self.seq_len = seq_len
        # students given as StudentSpec come to exist in configure_model (created sharded under ZeRO-3)
        self.specs = {k: v for k, v in students.items() if isinstance(v, StudentSpec)}
        self.students = nn.ModuleDict({k: v for k, v in students.items() if k not in self.specs})
        self.kinds = list(students)
        # each student's own summed loss per training step (loss_history holds their sum, the optimised loss)
        self.student_loss_history: dict[str, list[float]] = {k: [] for k in self.kinds}
        for s in self.students.values():
            self.freeze_for_ild(s, last_layer_target)

    def configure_model(self) -> None:
        for kind in self.kinds:
            if kind not in self.students:
                student = self.specs.pop(kind).materialise(self.trainer)
                student.train()
                self.freeze_for_ild(student, self.last_layer_target)
                self.students[kind] = student

    @staticmethod
    def freeze_for_ild(student: nn.Module, last_layer_target: str) -> None:
        """Embeddings and LM head never train in ILD; the final norm only under the normed last-layer target."""
        student.model.embed_tokens.weight.requires_grad_(False)
        student.lm_head.weight.requires_grad_(False)
        student.model.norm.weight.requires_grad_(last_layer_target == "normed")
        for layer in student.model.layers:
            for p in layer.parameters():
                p.requires_grad_(True)

    def flops_per_token(self) -> float:
        """One teacher forward (no logits) + each student's decoder layers forward and backward (zebra.plan.flops)."""
        from zebra.plan.flops import ild_step_flops

        configs = {k: s.config for k, s in self.students.items()}
        configs.update({k: spec.config for k, spec in self.specs.items()})
        return ild_step_flops(configs, self.frozen("teacher").config, self.seq_len)["total"]

    def ild_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per student: the summed layer (+ mixer) losses; plus per-layer values for logging."""
        ids, pos = batch["input_ids"], batch["position_ids"]
        attn = batch.get("attention_mask")
        weight = attn.float() if attn is not None else torch.ones_like(ids, dtype=torch.float32)
        tokens = self.token_denominator(weight.sum())
        pad_mask = attn if attn is not None and not bool(attn.all()) else None
        doc_ids = doc_ids_from_position_ids(pos) if pos.shape[1] > 1 and is_packed(pos) else None
        t = teacher_forward(self.frozen("teacher"), ids, pos, attn, hidden_states=True,
                                   mixer_outputs=self.mixer_loss,
                                   last_unnormed=self.last_layer_target == "unnormed")
        hs = t.hidden_states
        num_layers = len(hs) - 1
        out = {}
        for kind, student in self.students.items():
            layers = student.model.layers
            if len(layers) != num_layers:
                raise StageError(f"{kind} student has {len(layers)} layers, the teacher {num_layers}")
            captured: dict[int, torch.Tensor] = {}
            handles = []
            if self.mixer_loss:
                for i, layer in enumerate(layers):
                    def grab(_m, _a, o, i=i):
                        captured[i] = o
                    handles.append(layer.mixer.register_forward_hook(grab))
            total = torch.zeros((), device=ids.device)
            try:
                for i, layer in enumerate(layers):
                    x = hs[i].to(next(layer.parameters()).dtype) if not torch.is_autocast_enabled() else hs[i]
                    if self.gradient_checkpointing and self.training:
                        y = torch.utils.checkpoint.checkpoint(layer, x, pos, doc_ids, pad_mask, use_reentrant=False)
                    else:
                        y = layer(x, position_ids=pos, doc_ids=doc_ids, attention_mask=pad_mask)
                    if i == num_layers - 1:
                        if self.last_layer_target == "normed":
                            y, target = student.model.norm(y), hs[-1]
                        else:
                            target = t.last_unnormed
                    else:
                        target = hs[i + 1]
                    layer_loss = masked_l2(y, target, weight, tokens)
                    if self.mixer_loss:
                        layer_loss = layer_loss + self.mixer_loss_weight * masked_l2(captured.pop(i),
                                                                                     t.mixer_outputs[i], weight,
                                                                                     tokens)
                    total = total + layer_loss
            finally:
                for h in handles:
                    h.remove()
            out[kind] = total
        return out

    def training_step(self, batch, batch_idx):
        self.count_tokens(batch)
        losses = self.ild_losses(batch)
        loss = sum(losses.values())
        self.check_finite(loss)
        self.loss_history.append(float(loss.detach()))
        for kind, value in losses.items():
            self.student_loss_history.setdefault(kind, []).append(float(value.detach()))
        logs = {f"train/{k}_loss": v.detach() for k, v in losses.items()}
        logs["train/loss"] = loss.detach()
        logs["train/global_step"] = float(self.global_step)
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False, batch_size=batch["input_ids"].shape[0])
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["zebra"]["student_loss_history"] = {k: list(v) for k, v in self.student_loss_history.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("zebra", {}).get("student_loss_history", {})
        self.student_loss_history.update({k: list(v) for k, v in saved.items()})


def own_losses(history: list[float]) -> dict:
    """A student's own first and last training loss (the stage's loss_first / loss_last are the students' sum)."""
    return {"loss_first": history[0] if history else None, "loss_last": history[-1] if history else None}


def calibration_for_init(cfg: DictConfig, datamodule, init: dict) -> list[dict]:
    """The calibration rows the init options need (none when they need none): the first `init.calibration_rows`
    packed rows of the ILD split, cut into their documents (zebra.compose.calibration.calibration_rows)."""
    from zebra.compose.calibration import calibration_rows, needs_calibration

    if not needs_calibration(init):
        return []
    split = cfg.ilkd.split
    available = len(datamodule.rows(split))
    n = min(int(init["calibration_rows"]), available)
    if n < int(init["calibration_rows"]):
        log.warning("ilkd: init.calibration_rows=%d but split %r has %d rows: calibrating on all of them",
                    init["calibration_rows"], split, available)
    batches = datamodule.calibration_batches(n * int(cfg.ilkd.seq_len), split=split)
    rows = calibration_rows(batches, n_rows=None)
    if not rows:
        raise StageError(f"no calibration documents of at least 2 tokens in split {split!r}")
    return rows


# ------------------------------------------------------------------------------------------------ runner
def run(cfg: DictConfig) -> dict:
    """Train the students `ilkd.students` names (both, mla or mamba) and export each as its own part of the stage.
    The module is `ilkd.module` (an ILDModule, completed here with the students and the teacher)."""
    from zebra.compose.calibration import check_init_options
    from zebra.compose.students import build_student, zebra_config_from_teacher

    sc = cfg.ilkd
    start = time.perf_counter()
    kinds = KINDS if sc.students == "both" else (sc.students,)
    if any(k not in KINDS for k in kinds):
        raise StageError(f"ilkd.students must be both, mla or mamba, got {sc.students!r}")

    # cheap checks first: init options, data (paths, emptiness, enough tokens for one batch) before any model loads
    try:
        init = check_init_options(OmegaConf.to_container(cfg.init, resolve=True), from_config=True)
    except ValueError as err:
        raise StageError(str(err)) from err
    tokenizer = load_model_tokenizer(cfg.model.tokenizer)
    world = world_size(cfg)
    steps, datamodule = plan_token_stage(cfg, sc, tokenizer, world)
    # one checkpoint directory per set of students trained together (the pipeline may train them one by one)
    ckpt_dir = artifacts.checkpoint_dir(cfg, "ilkd", kinds)
    trainer, ckpt = build_trainer(cfg, "ilkd", sc, steps, world, ckpt_dir)  # another config's checkpoint: refused
    placement = teacher_placement(cfg, trainer)  # checked before any model loads

    teacher = load_teacher_model(cfg.model.teacher, cfg.model.base, dtype=teacher_dtype(cfg))
    if len(tokenizer) > teacher.model.config.vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer {cfg.model.tokenizer!r} has {len(tokenizer)} tokens but the base {cfg.model.teacher!r} has a "
            f"{teacher.model.config.vocab_size}-row vocabulary")

    mla_kwargs = OmegaConf.to_container(cfg.model.mla, resolve=True)
    # Under ZeRO-3 only rank 0 builds each student whole (on CPU, from the teacher); configure_model creates it
    # sharded and fills it from rank 0's copy one layer at a time.
    builds = zero_stage(trainer) != 3 or trainer.global_rank == 0
    calibration = calibration_for_init(cfg, datamodule, init) if builds else []
    students, init_reports = {}, {}
    for kind in kinds:
        num_layers = teacher.model.config.num_hidden_layers
        kwargs = {k: v for k, v in mla_kwargs.items() if k != "hybrid_layer_types"}
        spec = StudentSpec(zebra_config_from_teacher(teacher.model.config, [kind] * num_layers, **kwargs))
        init_reports[kind] = {}
        if builds:
            t0 = time.perf_counter()
            spec.full, rep = build_student(teacher.model, mla_kwargs, kind=kind, init=init, calibration=calibration)
            init_reports[kind] = {**(rep.get("mean") or {}), **rep["init"],
                                  "calibration_tokens": rep["calibration_tokens"]}
            log.info("ilkd: built the all-%s student in %.1f s", kind, time.perf_counter() - t0)
        students[kind] = spec

    module = instantiate(sc.module)(students=students, teacher=teacher.model, frozen_placement=placement,
                                    check_weights_moved=cfg.check_weights_moved)
    fit(trainer, module, datamodule, ckpt)
    summary = stage_summary(trainer, module, time.perf_counter() - start)
    digest = artifacts.stage_hash(cfg, "ilkd")
    report = {"stage": "ilkd", "config_hash": digest, "model": cfg.model.name,
              "teacher": cfg.model.teacher, "teacher_quantisation": teacher.quantisation,
              "teacher_placement": placement, "last_layer_target": module.last_layer_target,
              "mixer_loss": module.mixer_loss, "trained_together": list(kinds), **summary}
    # the report of both students: this run's, beside an earlier run's of the other student for the same config
    merged = artifacts.load(cfg, "ilkd", "report")
    previous = merged.get("students", {}) if merged.get("config_hash") == digest else {}
    merged = {**merged, **report, "students": dict(previous)}
    data = artifacts.dataset_description(cfg.data, "sft") + f" (split {sc.split})"
    for kind, student in module.students.items():
        student.eval()
        card = dict(title=f"zebra {cfg.model.name} all-{kind.upper()} student after ILD", stage="ilkd",
                    base=str(cfg.model.teacher), teacher=str(cfg.model.teacher),
                    teacher_quantisation=teacher.quantisation, data=data, tokens=module.tokens_seen,
                    extra={"last-layer target": module.last_layer_target, "mixer loss": module.mixer_loss})
        part = {"kind": kind, "config_hash": digest, "params": count_parameters(student),
                "kv_fraction": artifacts.kv_fraction(student.config), "init_errors": init_reports[kind],
                **own_losses(module.student_loss_history.get(kind, [])),
                "export": str(artifacts.output_path(cfg, "ilkd", kind))}
        # collective under ZeRO-3: every rank gathers the student (rank 0 writes it)
        merged["students"][kind] = artifacts.finish(cfg, "ilkd", trainer, part, part=kind, model=student,
                                                    tokenizer=tokenizer, card=card)
    report = artifacts.finish(cfg, "ilkd", trainer, merged, checkpoints=ckpt_dir)
    log.info("ilkd done: %s", artifacts.stage_dir(cfg, "ilkd"))
    return report
