"""The --curve mode's Lightning callback: held-out perplexity and KL(teacher || student) of the KD student on the
held-out text every `every_n_steps` optimiser steps (and before the first), one JSON line per point.

Scored with zebra.eval.metrics.score_batches on zebra.eval.heldout.text_rows, as stage=eval scores the text set.
A resumed run (ckpt_path=last) measures again the steps after its checkpoint: readers keep the last line per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl

from zebra.eval.heldout import text_rows
from zebra.eval.metrics import score_batches


class HeldoutCurve(pl.Callback):
    def __init__(self, out: str, tokenizer: str, every_n_steps: int = 50, seq_len: int = 512,
                 max_tokens: int | None = 4096, text: str | None = None):
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.out, self.tokenizer, self.every = Path(out), str(tokenizer), int(every_n_steps)
        self.seq_len, self.max_tokens, self.text = int(seq_len), max_tokens, text
        self.rows: list[dict] | None = None
        self._last: int | None = None  # the step last scored

    def _score(self, trainer: pl.Trainer, module) -> None:
        self._last = int(trainer.global_step)
        if not trainer.is_global_zero:
            return
        if self.rows is None:
            from zebra.stages.teacher import load_model_tokenizer

            self.rows, _ = text_rows(load_model_tokenizer(self.tokenizer), self.text, self.seq_len, self.max_tokens)
        with trainer.precision_plugin.forward_context():
            res = score_batches(module.student, module.frozen("teacher"), self.rows)
        point = {"step": int(trainer.global_step), "tokens": int(module.tokens_seen) * trainer.world_size,
                 "perplexity": res["perplexity"], "kl_to_teacher": res["kl_to_teacher"]}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a") as f:  # one line per point: a run killed at its time limit keeps every point
            f.write(json.dumps(point) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            self._score(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step and step % self.every == 0 and self._last != step:  # accumulation: several batches end a step
            self._score(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last != trainer.global_step:
            self._score(trainer, pl_module)


def read_curve(path: str | Path) -> list[dict]:
    """The points at `path`, the last line per step, in step order ([] when there is no file)."""
    path = Path(path)
    if not path.is_file():
        return []
    points = {}
    for line in path.read_text().splitlines():
        try:
            p = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        points[int(p["step"])] = p
    return [points[s] for s in sorted(points)]
