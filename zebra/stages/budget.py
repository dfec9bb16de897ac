"""What a training stage trains on and for how long: its data module, set up and checked before any model loads,
and its step budget."""

from __future__ import annotations

import math

from hydra.utils import instantiate
from omegaconf import DictConfig

from zebra.stages.errors import StageError


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
