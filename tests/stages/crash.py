"""A simulated crash for resume tests and drills (no side effects on import: processes that the tests start load
it as a Lightning callback, `+callbacks.kill._target_=tests.stages.crash.StopAtStep`)."""

from __future__ import annotations

import lightning.pytorch as pl


class KilledForTest(RuntimeError):
    pass


class StopAtStep(pl.Callback):
    """Raises before global step `step` runs, as a crash there would."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise KilledForTest(f"simulated kill at step {trainer.global_step}")
