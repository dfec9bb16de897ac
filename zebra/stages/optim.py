"""Optimisation shared by the training stages (METHOD §4b): parameter groups without weight decay on the SSM's
A_log / D / dt_bias, norms and biases; linear warm-up then cosine decay; fully trained models made ready."""

from __future__ import annotations

import math

import torch
from torch import nn


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
