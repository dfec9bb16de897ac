"""The Lightning side of launching (DESIGN.md §5): the Trainer's cluster plugin, and step-trace callbacks for
data-parallel equivalence checks and preemption drills.

`cluster_plugins` is instantiated from the trainer config (`trainer.plugins`, conf/trainer/cpu.yaml):

- several processes (devices x num_nodes > 1) must have been started by a launcher (torchrun, srun / submitit
  with tasks_per_node = devices); otherwise Lightning would re-execute train.py once per extra device (and Hydra
  would make a run directory per copy), so this refuses with the command to use;
- under Slurm it hands Lightning a `SLURMEnvironment(auto_requeue=False)`: submitit owns the requeue signal
  (USR2), Lightning's own SIGUSR1 handler (save an `hpc_ckpt` + `scontrol requeue`) is off, so a job is never
  requeued twice or resumed from two places (docs/clusters.md).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class LaunchError(RuntimeError):
    """Several processes were asked for, but no launcher started them."""


def _device_count(devices: Any, accelerator: str | None) -> int | None:
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        if devices == -1:
            return torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") else None
        return devices
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, str)):
        return len(devices)
    if isinstance(devices, str):
        s = devices.strip()
        if s.isdigit():
            return int(s)
        if "," in s:
            return len([x for x in s.split(",") if x.strip()])
        if s in ("auto", "-1") and accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.cuda.device_count()
        return 1 if s == "auto" else None
    return None


def _environment():
    """The cluster environment Lightning would pick (same order as its accelerator connector)."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return "torchelastic"
    # SLURMEnvironment.detect() without its "srun is available but not used" warning
    if "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return "slurm"
    if "LOCAL_RANK" in os.environ:  # LightningEnvironment: processes started by someone else (submitit local)
        return "external"
    return None


def launch_command(processes: int, nodes: int) -> str:
    if nodes > 1:
        return ("submit through Slurm: python train.py -m hydra/launcher=submitit_slurm ... (tasks_per_node = "
                "trainer.devices), or srun / torchrun --nnodes on every node")
    return f"torchrun --standalone --nproc-per-node={processes} train.py ..."


def launched_processes(env: str | None) -> int | None:
    """How many processes the launcher started for this run (None: unknown / not launched)."""
    value = os.environ.get("SLURM_NTASKS" if env == "slurm" else "WORLD_SIZE")
    return int(value) if value is not None and value.isdigit() else None


def cluster_plugins(devices: Any = 1, num_nodes: int = 1, accelerator: str | None = None) -> list:
    """Trainer plugins for how this process was started; see the module docstring."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    nodes = int(num_nodes or 1)
    per_node = _device_count(devices, str(accelerator) if accelerator is not None else None)
    env = _environment()
    wanted = per_node * nodes if per_node is not None else None
    if wanted is not None and wanted > 1 and env is None:
        raise LaunchError(
            f"trainer.devices={devices} x trainer.num_nodes={nodes} asks for {wanted} processes, but this process was "
            "not started by a launcher, and zebra does not let Lightning re-execute train.py (DESIGN.md §5). Start "
            f"one process per device: {launch_command(per_node, nodes)}")
    started = launched_processes(env)
    if wanted is not None and started is not None and started != wanted:
        # e.g. torchrun --nproc-per-node=2 with trainer.devices=1: every rank would train alone, all writing the
        # same artifacts
        raise LaunchError(
            f"the launcher started {started} processes but the trainer asks for trainer.devices={devices} x "
            f"trainer.num_nodes={nodes} = {wanted}; make them equal (torchrun --nproc-per-node, "
            "hydra.launcher.tasks_per_node, srun --ntasks-per-node)")
    if env == "slurm":
        return [SLURMEnvironment(auto_requeue=False)]
    return []


# ------------------------------------------------------------------------------------------------ callbacks
def _job_info() -> dict:
    info = {}
    for key, env in (("slurm_job_id", "SLURM_JOB_ID"), ("slurm_array_job_id", "SLURM_ARRAY_JOB_ID"),
                     ("slurm_array_task_id", "SLURM_ARRAY_TASK_ID"), ("slurm_restart_count", "SLURM_RESTART_COUNT")):
        if os.environ.get(env) is not None:
            info[key] = os.environ[env]
    return info


class StepTrace(pl.Callback):
    """Appends JSON lines to `path` from global rank 0:

    - `{"event": "start", "global_step": ..., "ckpt_path": ..., "world_size": ..., slurm ids}` when training starts
      (after a resume, global_step is the step restored from the checkpoint);
    - `{"event": "step", "step": s, "loss": l, "world_size": w}` per optimizer step, where `l` is the training loss
      averaged over the step's micro-batches and then over ranks: the loss of the global batch when every rank's
      loss is a mean over equally sized shares (what the data-parallel equivalence tests compare);
    - `{"event": "end", "global_step": ...}` when training ends normally.
    Step records also carry `tokens` (real tokens of the global batch), `seconds` (wall time since the previous
    step ended; the first step's since training started, so it includes warm-up) and, on GPUs, `peak_mem_gb`
    (the largest `torch.cuda.max_memory_allocated` over ranks since training started).

    The mean over ranks is a collective: every rank must carry this callback (it comes from the config).
    """

    def __init__(self, path: str, every_n_steps: int = 1):
        self.path = Path(path)
        self.every = max(1, int(every_n_steps))
        self._losses: list[torch.Tensor] = []
        self._tokens = 0
        self._step = None
        self._t_last = None

    def _write(self, trainer: pl.Trainer, record: dict) -> None:
        if trainer.global_rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")

    def on_train_start(self, trainer, pl_module):
        self._write(trainer, {"event": "start", "global_step": int(trainer.global_step),
                              "ckpt_path": trainer.ckpt_path, "world_size": trainer.world_size, "pid": os.getpid(),
                              **_job_info()})
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._t_last = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._step != trainer.global_step:
            self._step, self._losses = trainer.global_step, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(loss.detach().float().reshape(()))
        self._tokens += int(getattr(pl_module, "last_step_tokens", 0) or 0)
        if trainer.global_step == self._step:  # still accumulating this optimizer step
            return
        step = self._step
        if step % self.every == 0 and self._losses:
            # Lightning hands on each micro-batch's loss divided by accumulate_grad_batches: their sum is the mean
            mean = torch.stack(self._losses).sum().to(pl_module.device)
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
            tokens = trainer.strategy.reduce(torch.tensor(float(self._tokens), device=pl_module.device),
                                             reduce_op="sum")
            record = {"event": "step", "step": int(step), "loss": float(mean), "world_size": trainer.world_size,
                      "tokens": int(tokens), "seconds": round(time.perf_counter() - self._t_last, 6)}
            if torch.cuda.is_available():
                peak = torch.tensor(float(torch.cuda.max_memory_allocated()), device=pl_module.device)
                record["peak_mem_gb"] = round(float(trainer.strategy.reduce(peak, reduce_op="max")) / 1e9, 3)
            self._write(trainer, record)
        self._losses = []
        self._tokens = 0
        self._step = trainer.global_step
        self._t_last = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self._write(trainer, {"event": "end", "global_step": int(trainer.global_step)})


def read_step_trace(path: str | Path) -> list[list[dict]]:
    """A StepTrace file split at each `start` record: one list of records per fit (a stage, or a resumed
    attempt); empty when the file does not exist."""
    path = Path(path)
    runs: list[list[dict]] = []
    if not path.is_file():
        return runs
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record["event"] == "start":
            runs.append([])
        if runs:
            runs[-1].append(record)
    return runs


class Throttle(pl.Callback):
    """Makes every training batch last at least `seconds` (drills only: lets a tiny run live long enough to be
    preempted and requeued in a test)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        left = self.seconds - (time.monotonic() - self._t0)
        if left > 0:
            time.sleep(left)
