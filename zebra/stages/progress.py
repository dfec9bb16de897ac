"""Training progress a user can follow wherever the output goes: a bar on a terminal, named by the stage (not
Lightning's "Epoch 0/-2": stages train to a step budget, max_epochs=-1), and log lines every N steps or seconds
when the output is a file (a bar written to a log is carriage returns, shown only when the stage ends). Lightning's
repeated messages (one set per stage's Trainer) are shown once per process.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger("zebra.stages")


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def _metric(trainer: pl.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else None


def progress_line(stage: str, step: int, max_steps: int, elapsed: float, loss: float | None,
                  tokens_per_s: float | None) -> str:
    """`kd: step 10/40 (25%), loss 2.3100, 1,234 tokens/s, 0:00:12 elapsed, ~0:00:36 left`."""
    parts = [f"{stage}: step {step}/{max_steps} ({100 * step // max(1, max_steps)}%)"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tokens/s")
    left = elapsed / step * (max_steps - step) if step else None
    parts.append(f"{_clock(elapsed)} elapsed" + (f", ~{_clock(left)} left" if left is not None else ""))
    return ", ".join(parts)


class ProgressLog(pl.Callback):
    """A log line (zebra.stages logger, INFO) after every `every_n_steps` optimiser steps or `every_seconds`,
    whichever comes first, and after the last step; 0 turns either trigger off."""

    def __init__(self, stage: str, every_n_steps: int = 10, every_seconds: float = 30.0):
        self.stage, self.every_n, self.every_s = stage, max(0, int(every_n_steps)), max(0.0, float(every_seconds))
        self._start = self._last = 0.0
        self._step = -1
        self.lines: list[str] = []

    def on_train_start(self, trainer, module):
        self._start = self._last = time.perf_counter()
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step, now = trainer.global_step, time.perf_counter()
        if step == self._step or trainer.global_rank != 0:  # mid-accumulation, or not the rank that reports
            return
        self._step = step
        due = (self.every_n and step % self.every_n == 0) or (self.every_s and now - self._last >= self.every_s)
        if due or step >= trainer.max_steps:
            self._last = now
            line = progress_line(self.stage, step, trainer.max_steps, now - self._start, _metric(trainer, "loss"),
                                 _metric(trainer, "perf/tokens_per_s"))
            self.lines.append(line)
            log.info(line)


class StageProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, named by the stage."""

    def __init__(self, stage: str, **kwargs):
        super().__init__(**kwargs)
        self.stage = stage

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.stage)


def progress_callbacks(stage: str, bar: bool, every_n_steps: int, every_seconds: float) -> tuple[list, bool]:
    """(callbacks, whether the Trainer shows a bar): the stage's bar where `bar` is on and stderr is a terminal,
    else log lines."""
    show_once()
    if bar and sys.stderr.isatty():
        return [StageProgressBar(stage)], True
    return [ProgressLog(stage, every_n_steps, every_seconds)], False


class _Once(logging.Filter):
    """Passes each distinct message of a logger once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = record.getMessage()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def show_once() -> None:
    """Lightning's own notices ("GPU available: ...", tips, `srun` hints), which every stage's Trainer repeats,
    once per process."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Once) for f in logger.filters):
            logger.addFilter(_Once())
