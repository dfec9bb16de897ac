"""A one-layer StageModule whose gradient norm is in the thousands, and a one-step fit: what the clipping tests (CPU
and GPU) share."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from zebra.stages.module import StageModule


class Tiny(StageModule):
    """One linear layer whose loss is scaled so that its gradient norm is in the thousands; records the global
    gradient norm before and after Lightning's clipping step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.layer = torch.nn.Linear(8, 8)
        self.norms: list[tuple[float, float]] = []

    def training_step(self, batch, batch_idx):
        return 1e4 * self.layer(batch[0]).float().pow(2).mean()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        before = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.norms.append((before, float(torch.nn.utils.get_total_norm([p.grad for p in params]))))


def fused_adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, fused=True)


def fit_one_step(module: pl.LightningModule, precision: str, accelerator: str = "cpu", steps: int = 1) -> None:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 8)), batch_size=4)
    kw = {"precision": precision}
    if precision == "16-mixed":  # Lightning turns it into bf16 on CPU unless given the plugin, GradScaler included
        from lightning.pytorch.plugins.precision import MixedPrecision

        kw = {"plugins": [MixedPrecision("16-mixed", accelerator,
                                         scaler=torch.amp.GradScaler(accelerator, init_scale=1.0))]}
    trainer = pl.Trainer(accelerator=accelerator, devices=1, gradient_clip_val=1.0, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(module, train_dataloaders=data)
