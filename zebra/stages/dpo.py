"""Stage `dpo`: direct preference optimisation of the KD'd hybrid (METHOD §7).

Policy = the KD export, reference = a frozen copy of it (kept out of the module's parameters and checkpoints).
Sigmoid loss -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) on summed reply log-probs; chosen and
rejected run through each model in one batched forward.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from zebra.plan.describe import count_parameters
from zebra.stages import artifacts, zero
from zebra.stages.budget import plan_pair_stage, world_size
from zebra.stages.losses import dpo_sigmoid_loss, lm_head_weight, sequence_logps
from zebra.stages.module import StageModule, StudentSpec, stage_summary
from zebra.stages.teacher import teacher_dtype, teacher_placement
from zebra.stages.trainer import build_trainer, fit
from zebra.stages.zero import zero_stage

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
                 optimizer=None, scheduler=None, check_weights_moved: bool = False,
                 frozen_placement: str = "replicated"):
        super().__init__(optimizer, scheduler, check_weights_moved, frozen_placement)
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


def run(cfg: DictConfig) -> dict:
    """Preference-tune the KD export against a frozen copy of it, then export the policy. The module is
    `dpo.module` (a DPOModule, completed here with the policy and the reference)."""
    sc = cfg.dpo
    start = time.perf_counter()
    tokenizer = artifacts.load(cfg, "kd", "tokenizer")
    world = world_size(cfg)
    steps, dm = plan_pair_stage(cfg, sc, tokenizer, world)
    ckpt_dir = artifacts.checkpoint_dir(cfg, "dpo")
    trainer, ckpt = build_trainer(cfg, "dpo", sc, steps, world, ckpt_dir)  # another config's checkpoint: refused
    # the frozen reference is placed like the other stages' teachers (replicated, or in its own ZeRO-3 engine);
    # checked before any model loads
    placement = teacher_placement(cfg, trainer)
    # The policy: under ZeRO-3 only rank 0 loads the whole fp32 copy (on CPU); configure_model creates it sharded
    # and fills it from there. The frozen reference is loaded on every rank in its own dtype, like a teacher.
    spec = StudentSpec(artifacts.load(cfg, "kd", "config"))
    if zero_stage(trainer) != 3 or trainer.global_rank == 0:
        spec.full = artifacts.load(cfg, "kd", dtype=torch.float32)
    reference = artifacts.load(cfg, "kd", dtype=teacher_dtype(cfg))
    module = instantiate(sc.module)(policy=spec, reference=reference, frozen_placement=placement,
                                    check_weights_moved=cfg.check_weights_moved)
    fit(trainer, module, dm, ckpt)
    policy = module.policy
    pairs = steps * int(sc.batch_size) * int(sc.accumulate_grad_batches) * world
    report = {"stage": "dpo", "config_hash": artifacts.stage_hash(cfg, "dpo"), "model": cfg.model.name,
              "mix": cfg.mix.name, "params": count_parameters(policy),
              "kv_fraction": artifacts.kv_fraction(policy.config), "beta": module.beta, "pairs_seen": pairs,
              "reference_placement": placement,
              # "sharded" under ZeRO-3: created partitioned (zero.Init), filled from rank 0's copy
              "policy_created": spec.created,
              **stage_summary(trainer, module, time.perf_counter() - start)}
    policy.eval()
    card = dict(title=f"zebra {cfg.model.name} {cfg.mix.name} hybrid after DPO", stage="dpo",
                base=str(cfg.model.teacher), teacher=str(cfg.model.kd_teacher) + " (KD); DPO reference = KD'd hybrid",
                teacher_quantisation=artifacts.load(cfg, "kd", "report").get("teacher_quantisation", "unknown"),
                data=artifacts.dataset_description(cfg.data, "preference"), tokens=module.tokens_seen,
                extra={"DPO beta": module.beta, "preference pairs": pairs})
    # collective under ZeRO-3 (every rank gathers; rank 0 writes)
    report = artifacts.finish(cfg, "dpo", trainer, report, model=policy, tokenizer=tokenizer, card=card,
                              checkpoints=ckpt_dir)
    log.info("dpo done: %s", artifacts.stage_dir(cfg, "dpo"))
    return report
