"""Stage `dpo`: direct preference optimisation of the KD'd hybrid (METHOD §7).

Policy = the KD export, reference = a frozen copy of it (kept out of the module's parameters and checkpoints).
Sigmoid loss -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on summed reply log-probs; chosen and
rejected run through each model in one batched forward.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from zebra.stages import zero
from zebra.stages.errors import MissingArtifactError, StageError
from zebra.stages.losses import dpo_sigmoid_loss, lm_head_weight, sequence_logps
from zebra.stages.artifacts import dataset_description, export_stage_model, kv_fraction, model_card, read_json, stage_hash
from zebra.stages.budget import instantiate_plain
from zebra.stages.module import StageModule, StudentSpec, stage_summary
from zebra.stages.teacher import teacher_dtype, teacher_placement
from zebra.stages.trainer import build_trainer, drop_checkpoints, fit, resolve_ckpt_path
from zebra.stages.zero import zero_stage
from zebra.plan.describe import count_parameters
from zebra.utils.files import write_json_atomic

log = logging.getLogger("zebra.stages.dpo")


def stacked(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chosen rows then rejected rows: input_ids, attention_mask, loss_mask [2B, T]."""
    return tuple(torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], 0)
                 for k in ("input_ids", "attention_mask", "loss_mask"))


class DPOModule(StageModule):
    """`policy`: the KD'd hybrid itself, or a `StudentSpec` that `configure_model` turns into it (created sharded
    under ZeRO-3, filled from rank 0's copy: no rank but 0 ever holds the whole trained model)."""

    def __init__(self, policy: nn.Module | StudentSpec, reference: nn.Module, beta: float = 0.01,
                 label_smoothing: float = 0.0, gradient_checkpointing: bool = False, seq_len: int = 0,
                 optimizer=None, scheduler=None, check_weights_moved: bool = False):
        super().__init__(optimizer, scheduler, check_weights_moved=check_weights_moved)
        self.policy = self.adopt_trained(policy, gradient_checkpointing)
        self.add_frozen("reference", reference)
        self.beta, self.label_smoothing, self.seq_len = float(beta), float(label_smoothing), seq_len

    def configure_model(self) -> None:
        self.policy = self.materialise_trained(self.policy)

    def flops_per_token(self) -> float:
        from zebra.plan.flops import forward_flops_per_token

        # policy forward + backward (3x), reference forward
        return 4.0 * forward_flops_per_token(self.trained_config(self.policy), self.seq_len)

    def on_train_start(self) -> None:
        super().on_train_start()
        self.register_with_engine([lm_head_weight(self.policy)])  # the sequence log-probs read it directly

    @staticmethod
    def logps(model: nn.Module, ids, attn, loss_mask) -> torch.Tensor:
        hidden = model.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        head = lm_head_weight(model)
        # a frozen head (the reference in its own ZeRO-3 engine, teacher_placement=zero3) is gathered read-only;
        # the policy's trained head is registered with the training engine (on_train_start)
        with zero.gathered([head]) if not head.requires_grad else contextlib.nullcontext():
            return sequence_logps(hidden, head, ids, loss_mask)

    def dpo_loss(self, batch: dict):
        ids, attn, lm = stacked(batch)
        b = batch["chosen_input_ids"].shape[0]
        pol = self.logps(self.policy, ids, attn, lm)
        with torch.no_grad():
            ref = self.logps(self.frozen("reference"), ids, attn, lm)
        loss, rc, rr = dpo_sigmoid_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=self.beta,
                                        label_smoothing=self.label_smoothing)
        return loss, {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(),
                      "rewards/accuracy": (rc > rr).float().mean(), "rewards/margin": (rc - rr).mean(),
                      "logps/chosen": pol[:b].detach().mean(), "logps/rejected": pol[b:].detach().mean()}

    def training_step(self, batch, batch_idx):
        self.count_tokens({"attention_mask": torch.cat([batch["chosen_attention_mask"],
                                                         batch["rejected_attention_mask"]])})
        loss, stats = self.dpo_loss(batch)
        self.check_finite(loss)
        self.loss_history.append(float(loss.detach()))
        b = batch["chosen_input_ids"].shape[0]
        self.log_dict({"train/loss": loss.detach(), "train/global_step": float(self.global_step),
                       **{f"train/{k}": v for k, v in stats.items()}}, on_step=True, on_epoch=False, batch_size=b)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
        return loss


def kd_export_dir(cfg: DictConfig) -> Path:
    path = Path(cfg.paths.kd_dir) / "model"
    if not (path / "config.json").is_file():
        raise MissingArtifactError(f"the KD'd hybrid is missing: {path} (run `python train.py stage=kd` first with "
                                   "the same model/mix/paths settings)")
    return path


def load_kd_export(path: Path, dtype: torch.dtype):
    from zebra.model import ZebraForCausalLM

    return ZebraForCausalLM.from_pretrained(path, dtype=dtype)  # A_log, D, dt_bias stay fp32 (the model says so)


def run(cfg: DictConfig) -> dict:
    from transformers import AutoTokenizer

    from zebra.model import ZebraConfig

    sc = cfg.dpo
    start = time.perf_counter()
    out_dir = Path(cfg.paths.dpo_dir)
    accumulate = int(sc.get("accumulate_grad_batches", 1) or 1)
    trainer = build_trainer(cfg, "dpo", out_dir, max_steps=1, stage_cfg=sc, accumulate_grad_batches=accumulate)
    # the frozen reference is placed like the other stages' teachers (replicated, or in its own ZeRO-3 engine);
    # checked before any model loads
    placement = teacher_placement(cfg, trainer)
    path = kd_export_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if cfg.data.get("preference") is None:
        raise StageError(f"data config {cfg.data.get('name')!r} has no `preference` section")
    dm = instantiate_plain(cfg.data.preference, tokenizer=tokenizer, max_length=int(sc.max_length),
                     max_prompt_length=int(sc.max_prompt_length), batch_size=int(sc.batch_size))
    dm.num_batches(trainer.world_size)  # fails early, naming the data, when there is not one global batch
    # The policy: under ZeRO-3 only rank 0 loads the whole fp32 copy (on CPU); configure_model creates it sharded
    # and fills it from there. The frozen reference is loaded on every rank in its own dtype, like a teacher.
    spec = StudentSpec(ZebraConfig.from_pretrained(path))
    if zero_stage(trainer) != 3 or trainer.global_rank == 0:
        spec.full = load_kd_export(path, torch.float32)
    reference = load_kd_export(path, teacher_dtype(cfg))
    module = DPOModule(spec, reference, beta=sc.beta, label_smoothing=sc.label_smoothing,
                       gradient_checkpointing=sc.gradient_checkpointing, seq_len=int(sc.max_length),
                       optimizer=instantiate(sc.optimizer), scheduler=instantiate(sc.scheduler),
                       check_weights_moved=bool(cfg.get("check_weights_moved")))
    module.frozen_placement = placement
    world = trainer.world_size
    if sc.get("max_steps"):
        steps = int(sc.max_steps)
    elif sc.get("epochs"):
        steps = max(1, math.ceil(float(sc.epochs) * dm.num_batches(world) / accumulate))
    else:
        steps = max(1, math.ceil(int(sc.pairs) / (int(sc.batch_size) * accumulate * world)))
    trainer.fit_loop.epoch_loop.max_steps = steps
    fit(trainer, module, dm, resolve_ckpt_path(cfg, out_dir / "checkpoints"))
    policy = module.policy
    wall = time.perf_counter() - start
    report = {"stage": "dpo", "config_hash": stage_hash("dpo", cfg), "model": cfg.model.name,
              "mix": cfg.mix.name, "params": count_parameters(policy), "kv_fraction": kv_fraction(policy.config),
              "beta": sc.beta, "pairs_seen": steps * int(sc.batch_size) * accumulate * world,
              "reference_placement": placement,
              # "sharded" under ZeRO-3: created partitioned (zero.Init), filled from rank 0's copy
              "policy_created": spec.created,
              **stage_summary(trainer, module, wall)}
    policy.eval()
    card = model_card(
        title=f"zebra {cfg.model.name} {cfg.mix.name} hybrid after DPO", stage="dpo", model=policy,
        base=str(cfg.model.teacher), teacher=str(cfg.model.kd_teacher) + " (KD); DPO reference = KD'd hybrid",
        teacher_quantisation=kd_teacher_quantisation(cfg),
        data=dataset_description(cfg.data, "preference"), tokens=module.tokens_seen,
        extra={"DPO beta": sc.beta, "preference pairs": report["pairs_seen"]})
    # collective under ZeRO-3 (every rank gathers; rank 0 writes)
    report["export_check"] = export_stage_model(cfg, trainer, policy, tokenizer, out_dir / "model", card)
    if trainer.global_rank == 0:
        write_json_atomic(out_dir / "report.json", report)
        drop_checkpoints(cfg, trainer, out_dir / "checkpoints")
        log.info("dpo done: %s", out_dir)
    return report


def kd_teacher_quantisation(cfg: DictConfig) -> str:
    rep = Path(cfg.paths.kd_dir) / "report.json"
    try:
        return read_json(rep).get("teacher_quantisation", "unknown")
    except (OSError, ValueError):
        return "unknown"
