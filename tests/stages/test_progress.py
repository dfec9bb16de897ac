"""Progress as log lines (zebra.stages.progress): one line every N optimiser steps or seconds, and at the end."""

from __future__ import annotations

import logging
import types

import torch

from zebra.stages.progress import ProgressLog, progress_line, show_once


def test_progress_line():
    assert progress_line("kd", 10, 40, 12.0, 2.31, 1234.4) == \
        "kd: step 10/40 (25%), loss 2.3100, 1,234 tokens/s, 0:00:12 elapsed, ~0:00:36 left"
    assert progress_line("dpo", 0, 8, 0.0, None, None) == "dpo: step 0/8 (0%), 0:00:00 elapsed"


def fake_trainer(max_steps: int):
    return types.SimpleNamespace(global_step=0, max_steps=max_steps, global_rank=0,
                                 callback_metrics={"loss": torch.tensor(1.5)})


def test_a_line_every_n_optimiser_steps_and_after_the_last():
    trainer, cb = fake_trainer(7), ProgressLog("ilkd", every_n_steps=3, every_seconds=0)
    cb.on_train_start(trainer, None)
    for micro in range(14):  # two micro-batches per optimiser step: a step is reported once
        trainer.global_step = (micro + 1) // 2
        cb.on_train_batch_end(trainer, None, None, None, micro)
    assert [line.split(",")[0] for line in cb.lines] == ["ilkd: step 3/7 (42%)", "ilkd: step 6/7 (85%)",
                                                         "ilkd: step 7/7 (100%)"]
    assert all("loss 1.5000" in line for line in cb.lines)


def test_a_line_after_every_seconds(monkeypatch):
    clock = iter(range(0, 1000, 20))  # each call 20 s later
    monkeypatch.setattr("zebra.stages.progress.time.perf_counter", lambda: float(next(clock)))
    trainer, cb = fake_trainer(100), ProgressLog("kd", every_n_steps=0, every_seconds=30)
    cb.on_train_start(trainer, None)
    for step in range(1, 5):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, step)
    assert [line.split(",")[0] for line in cb.lines] == ["kd: step 2/100 (2%)", "kd: step 4/100 (4%)"]


def test_lightning_notices_once(caplog):
    show_once()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(3):
            logger.info("a notice every Trainer repeats (progress test)")
    assert [r.getMessage() for r in caplog.records].count("a notice every Trainer repeats (progress test)") == 1
