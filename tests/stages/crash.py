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


class SignalAtStep(pl.Callback):
    """Sends `signal` (a name: SIGINT, SIGTERM, SIGKILL) to its own process before global step `step` runs, as a
    user's Ctrl-C, a scheduler's SIGTERM or the OOM killer would."""

    def __init__(self, step: int, signal: str):
        self.step, self.signal = int(step), str(signal)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        import os
        import signal

        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))
