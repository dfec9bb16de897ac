"""What a training stage trains on and for how long, known before its Trainer is built: the processes that train,
the data module (set up and checked before any model loads, so bad data fails in seconds with its own message)
and the step budget.

Budget, the first that is set: `max_steps`; an amount (`tokens` for the token stages, rows of seq_len tokens;
`pairs` for DPO) divided by what one optimiser step consumes, rounded up; `epochs`, passes over the split.
"""

from __future__ import annotations

import math

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from zebra.stages.errors import StageError


def world_size(cfg: DictConfig) -> int:
    """Processes that will train: trainer.devices (a count, a list, "auto": every GPU, else one) x num_nodes.
    The Trainer built from the same config must agree (zebra.stages.trainer.build_trainer checks)."""
    devices, accelerator = cfg.trainer.devices, str(cfg.trainer.accelerator)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif str(devices).strip() in ("auto", "-1"):
        gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        per_node = torch.cuda.device_count() if gpu else 1
    elif "," in str(devices):
        per_node = len([d for d in str(devices).split(",") if d.strip()])
    else:
        per_node = int(devices)
    return max(1, per_node) * int(cfg.trainer.num_nodes)


def fixed_steps(sc: DictConfig, amount, per_step: int) -> int | None:
    """Optimiser steps from `max_steps` or `amount` / `per_step`; None when only `epochs` is set (the steps are
    then known once the data are counted: `epoch_steps`)."""
    if sc.max_steps:
        return int(sc.max_steps)
    if amount:
        return max(1, math.ceil(int(amount) / per_step))
    if sc.epochs:
        return None
    raise StageError("set one of max_steps, tokens (DPO: pairs) or epochs for the stage's budget")


def epoch_steps(sc: DictConfig, batches_per_epoch: int) -> int:
    return max(1, math.ceil(float(sc.epochs) * batches_per_epoch / int(sc.accumulate_grad_batches)))


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


def token_data(cfg: DictConfig, tokenizer, split: str, seq_len: int, batch_size: int,
               max_tokens: int | None = None, assistant_only: bool = False):
    """The token-mixture DataModule of `cfg.data.sft` for one stage's split and shapes (not yet set up)."""
    if cfg.data.get("sft") is None:
        raise StageError(f"data config {cfg.data.get('name')!r} has no `sft` (token mixture) section")
    return instantiate_plain(cfg.data.sft, tokenizer=tokenizer, split=split, seq_len=int(seq_len),
                             batch_size=int(batch_size), max_tokens=max_tokens, assistant_only=bool(assistant_only))


def plan_token_stage(cfg: DictConfig, sc: DictConfig, tokenizer, world: int, assistant_only: bool = False):
    """(steps, data module, set up and checked) of a stage trained on the token mixture (`sc`: its config node)."""
    unit = int(sc.seq_len) * int(sc.batch_size) * int(sc.accumulate_grad_batches) * world
    steps = fixed_steps(sc, sc.tokens, unit)
    # epochs: one Lightning epoch is one pass over the split; the row stream continues into further passes
    dm = token_data(cfg, tokenizer, sc.split, sc.seq_len, sc.batch_size,
                    max_tokens=steps * unit if steps is not None else None, assistant_only=assistant_only)
    dm.setup()
    batches = dm.num_batches(world)  # raises, naming the data, when there is not one global batch
    return (steps if steps is not None else epoch_steps(sc, batches)), dm


def plan_pair_stage(cfg: DictConfig, sc: DictConfig, tokenizer, world: int):
    """(steps, data module, checked) of a stage trained on preference pairs (`sc`: its config node)."""
    if cfg.data.get("preference") is None:
        raise StageError(f"data config {cfg.data.get('name')!r} has no `preference` section")
    dm = instantiate_plain(cfg.data.preference, tokenizer=tokenizer, max_length=int(sc.max_length),
                           max_prompt_length=int(sc.max_prompt_length), batch_size=int(sc.batch_size))
    batches = dm.num_batches(world)  # raises, naming the data, when there is not one global batch
    steps = fixed_steps(sc, sc.pairs, int(sc.batch_size) * int(sc.accumulate_grad_batches) * world)
    return (steps if steps is not None else epoch_steps(sc, batches)), dm
