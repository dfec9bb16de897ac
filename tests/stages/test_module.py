"""StageModule: each stage's module built from its config node, and gradient clipping at global norm 1.0 under
the default fused AdamW in every precision that can clip it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate

from stage_helpers import compose_cfg
from tests.helpers.clipping import Tiny, fit_one_step, fused_adamw
from zebra.stages.dpo import DPOModule
from zebra.stages.errors import StageError
from zebra.stages.ilkd import ILDModule
from zebra.stages.kd import KDModule
from zebra.stages.module import StudentSpec


def test_each_stage_builds_its_module_from_config():
    cfg = compose_cfg(["kd.optimizer.lr=1e-3", "kd.module.temperature=2.0", "kd.gradient_checkpointing=true",
                       "dpo.module.beta=0.05", "ilkd.module.last_layer_target=unnormed", "ilkd.seq_len=64"])
    student = StudentSpec(config=None)  # created in configure_model
    kd = instantiate(cfg.kd.module)(student=student, teacher=torch.nn.Linear(2, 2), heldout=[],
                                    frozen_placement="zero3")
    assert isinstance(kd, KDModule) and kd.temperature == 2.0 and kd.ce_weight == 0.0 and kd.reduction == "sequence"
    assert kd.frozen_placement == "zero3" and kd.gradient_checkpointing and kd.seq_len == 256
    opt = kd.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 1e-3
    assert kd.scheduler_factory.func.__name__ == "warmup_cosine"
    dpo = instantiate(cfg.dpo.module)(policy=torch.nn.Linear(2, 2), reference=torch.nn.Linear(2, 2))
    assert isinstance(dpo, DPOModule) and dpo.beta == 0.05 and dpo.seq_len == cfg.dpo.max_length
    assert dpo.optimizer_factory.keywords["lr"] == 5e-7
    ild = instantiate(cfg.ilkd.module)
    assert ild.func is ILDModule and ild.keywords["last_layer_target"] == "unnormed" and ild.keywords["seq_len"] == 64


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_gradients_clipped_to_norm_one(precision):
    torch.manual_seed(0)
    module = Tiny(optimizer=fused_adamw)
    fit_one_step(module, precision)
    (before, after), = module.norms
    assert before > 100.0  # clipping had something to do
    assert after <= 1.0 + 1e-5 and after == pytest.approx(1.0, rel=1e-4)


def test_lightning_alone_refuses_to_clip_fused_adamw_under_bf16():
    """What StageModule.configure_gradient_clipping exists for: Lightning's own hook raises at the first step."""

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 8)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).float().pow(2).mean()

        def configure_optimizers(self):
            return fused_adamw(self.parameters())

    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit_one_step(Plain(), "bf16-mixed")


def test_fp16_with_fused_adamw_refuses_before_the_first_step():
    module = Tiny(optimizer=fused_adamw)
    with pytest.raises(StageError, match="optimizer.fused=false"):
        fit_one_step(module, "16-mixed")
    assert module.norms == []
    plain = Tiny(optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, fused=False))
    fit_one_step(plain, "16-mixed")  # the scaler unscales before clipping: allowed, and clipped
    assert plain.norms and plain.norms[0][1] <= 1.0 + 1e-5


def test_every_training_stage_runs_in_bf16_with_fused_adamw_and_clipping(make_cfg):
    """trainer=gpu's precision on the CPU: ilkd, kd and dpo train with the default optimizer (fused AdamW) and
    clipping at norm 1.0, where Lightning alone stops at the first optimizer step."""
    import math

    from zebra.stages.run import run

    cfg = make_cfg("stage=pipeline", "stage.order=[ilkd,kd,dpo]", "trainer.precision=bf16-mixed", "logger=none",
                   "ilkd.tokens=64", "kd.tokens=64", "kd.heldout_batches=0", "dpo.pairs=2")
    assert cfg.kd.optimizer.fused and cfg.trainer.gradient_clip_val == 1.0
    summary = run(cfg)
    for stage in ("ilkd", "kd", "dpo"):
        assert not summary[stage]["skipped"] and math.isfinite(summary[stage]["loss_last"]), summary[stage]
