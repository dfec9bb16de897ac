"""The Lightning Trainer of a training stage: `cfg.trainer` with the stage's step budget, checkpoints (retention,
disk-space warning, resume from `ckpt_path`), throughput/MFU logging, loggers, and `fit` with what must follow it.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from zebra.launch import NO_CHECKPOINT
from zebra.stages import zero
from zebra.stages.artifacts import check_resume, checkpoint_dir, resume_identity, stage_dir
from zebra.stages.errors import StageError
from zebra.stages.progress import progress_callbacks

log = logging.getLogger("zebra.stages")


def set_threads(num_threads: int | None) -> None:
    """Intra-op threads: the configured number, else this process's share of the cores it may run on (the
    cores divided by the processes a launcher started on this node: LOCAL_WORLD_SIZE from torchrun,
    SLURM_NTASKS_PER_NODE under srun). Each process taking every core made the students' SVD init 10x slower
    on a two-GPU node."""
    if not num_threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "1"
        try:
            share = max(1, int(str(local).split("(")[0]))
        except ValueError:
            share = 1
        num_threads = max(1, cores // share)
    torch.set_num_threads(max(1, int(num_threads)))


# ------------------------------------------------------------------------------------------------ callbacks
def default_peak_flops(device: torch.device | str | None = None) -> float:
    """Dense bf16 peak of known GPUs; CPUs get a nominal 50 GFLOP/s per core (MFU there is only indicative)."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device)).lower()
        # H100/H200: the bf16 matmul rate measured on the lent cards (benchmarks.training), not the 989 spec
        for key, peak in (("h200", 790e12), ("h100", 790e12), ("a100", 312e12), ("l40", 181e12),
                          ("a10", 125e12), ("4090", 165e12), ("v100", 125e12)):
            if key in name:
                return peak
        return 100e12
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 50e9 * min(cores, torch.get_num_threads())


class ThroughputMonitor(pl.Callback):
    """Logs tokens/s and MFU every step (FLOPs per token from the module's `flops_per_token()`).

    A step's time runs from the end of the previous micro-batch to the end of this one (data loading and the
    optimizer included): GPU work is asynchronous, so only end-to-end intervals between the points where the
    host waits for it (the logged loss) measure the device, not a start/end pair around one batch."""

    def __init__(self, peak_flops: float | None = None, log_every_n_steps: int = 1):
        self.peak_flops = peak_flops
        self.every = max(1, int(log_every_n_steps))
        self._t_last = None
        self._fpt = None

    def on_train_start(self, trainer, module):
        self._fpt = float(module.flops_per_token()) if hasattr(module, "flops_per_token") else None
        if self.peak_flops is None:
            self.peak_flops = default_peak_flops(module.device)
        self._t_last = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        dt, self._t_last = now - (self._t_last or now), now
        tokens = getattr(module, "last_step_tokens", 0) * trainer.world_size
        if tokens and dt > 0 and trainer.global_step % self.every == 0:
            tps = tokens / dt
            metrics = {"perf/tokens_per_s": tps}
            if self._fpt:
                metrics["perf/mfu"] = tps * self._fpt / (self.peak_flops * trainer.world_size)
            module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=True, logger=True, batch_size=1)


class CheckpointDiskSpace(pl.Callback):
    """Warns at the start of training when the planned checkpoints would not fit the free disk."""

    def __init__(self, dirpath: str, keep: int = 1, weights_only: bool = False):
        self.dirpath, self.keep, self.weights_only = dirpath, max(1, keep), weights_only

    def estimate_bytes(self, module: nn.Module) -> int:
        size = sum(t.numel() * t.element_size() for t in module.state_dict().values() if torch.is_tensor(t))
        if not self.weights_only:  # AdamW: two fp32 moments per trainable parameter
            size += sum(2 * 4 * p.numel() for p in module.parameters() if p.requires_grad)
        return int(size)

    def on_train_start(self, trainer, module):
        if trainer.global_rank != 0:
            return
        need = self.estimate_bytes(module) * (self.keep + 1)  # + the one being written before the oldest goes
        path = Path(self.dirpath)
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if need > free:
            msg = (f"checkpoints under {path} will need ~{need / 2**30:.1f} GiB ({self.keep} kept + last) but only "
                   f"{free / 2**30:.1f} GiB are free; lower checkpoint.keep or use weights-only checkpoints")
            warnings.warn(msg)
            log.warning(msg)


# ------------------------------------------------------------------------------------------------ trainer
class ResumeGuard(pl.Callback):
    """Records in every checkpoint the config it was trained under (zebra.stages.artifacts.resume_identity), and
    refuses one of another config when it loads: DeepSpeed's checkpoint directories too, which resolve_ckpt_path
    cannot peek before the models are built."""

    KEY = "zebra_resume_identity"

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.KEY] = self.identity

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        check_resume(checkpoint.get(self.KEY), self.identity, "the checkpoint")


def build_loggers(cfg: DictConfig, stage: str, stage_dir: Path) -> list:
    """`cfg.logger`'s loggers, writing under the stage's directory unless they name their own."""
    loggers = []
    for lcfg in cfg.logger.values():
        if lcfg is None or "_target_" not in lcfg:
            continue
        target = lcfg._target_
        kwargs = {}
        if target.endswith("WandbLogger"):
            kwargs["name"] = lcfg.get("name") or f"{cfg.model.name}-{stage}"
            kwargs["group"] = lcfg.get("group") or f"{cfg.model.name}"
            kwargs["save_dir"] = lcfg.get("save_dir") or str(stage_dir)
        elif target.endswith(("CSVLogger", "TensorBoardLogger")):
            kwargs["save_dir"] = lcfg.get("save_dir") or str(stage_dir)
        loggers.append(instantiate(lcfg, **kwargs))
    return loggers


def build_strategy(scfg):
    return instantiate(scfg) if "_target_" in scfg else scfg.name


def build_trainer(cfg: DictConfig, stage: str, sc: DictConfig, max_steps: int, world: int,
                  ckpt_dir: Path | None = None) -> tuple[pl.Trainer, str | None]:
    """The Lightning Trainer of one stage (`sc`: its config node) and the checkpoint it resumes from (`cfg.ckpt_path`
    resolved by resolve_ckpt_path: None for a fresh start; one of another config is refused here, before any model
    loads). The Trainer: `cfg.trainer` (instantiated) with the stage's step budget and gradient accumulation,
    checkpoints under `ckpt_dir` (default `<stage dir>/checkpoints`; retention + last) that record the run's config
    (ResumeGuard), throughput/MFU and disk-space callbacks, `cfg.callbacks`, the loggers. `world`: the processes the
    budget was planned for (zebra.stages.budget.world_size), which the Trainer must agree with."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    out_dir = stage_dir(cfg, stage)
    ckpt_dir = ckpt_dir or checkpoint_dir(cfg, stage)
    ckpt = cfg.checkpoint
    every = int(sc.checkpoint_every_n_steps or ckpt.every_n_steps or 0)
    keep, weights_only = int(ckpt.keep), bool(ckpt.weights_only)
    identity = resume_identity(cfg, stage)
    resume_from = resolve_ckpt_path(cfg, ckpt_dir, identity)
    callbacks = [ResumeGuard(identity)]
    if every > 0:
        # newest `keep` step checkpoints (monitoring the step), and last.ckpt as a link to the newest: no copy
        callbacks.append(ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:06d}",
                                         auto_insert_metric_name=False, every_n_train_steps=every, save_last="link",
                                         save_top_k=keep, monitor="train/global_step", mode="max",
                                         save_weights_only=weights_only))
        callbacks.append(CheckpointDiskSpace(str(ckpt_dir), keep=keep, weights_only=weights_only))
    callbacks.append(ThroughputMonitor(peak_flops=cfg.perf.peak_flops,
                                       log_every_n_steps=int(cfg.trainer.log_every_n_steps)))
    shown, bar = progress_callbacks(stage, bool(cfg.trainer.enable_progress_bar), cfg.progress.every_n_steps,
                                    cfg.progress.every_seconds)
    callbacks += shown
    for cb in cfg.callbacks.values():
        if cb is not None and "_target_" in cb:
            callbacks.append(instantiate(cb))
    loggers = build_loggers(cfg, stage, out_dir)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = instantiate(cfg.trainer, max_steps=int(max_steps),
                          accumulate_grad_batches=int(sc.accumulate_grad_batches), callbacks=callbacks,
                          logger=loggers or False, strategy=build_strategy(cfg.strategy),
                          default_root_dir=str(out_dir), enable_checkpointing=every > 0, enable_progress_bar=bar)
    if trainer.world_size != world:
        raise StageError(f"the {stage} budget was planned for {world} processes (trainer.devices x trainer.num_nodes) "
                         f"but the Trainer runs {trainer.world_size}; set trainer.devices to the processes per node")
    return trainer, resume_from


def resolve_ckpt_path(cfg: DictConfig, ckpt_dir: Path, identity: dict) -> str | None:
    """`ckpt_path=last` resumes from `<ckpt_dir>/last.ckpt` when it exists (a fresh start otherwise, so a
    requeued job that never reached a checkpoint just starts); any other value is a path. A checkpoint file whose
    recorded config differs from `identity` (the run's zebra.stages.artifacts.resume_identity) is refused here,
    before any model loads; a DeepSpeed directory when it loads (ResumeGuard)."""
    ckpt = cfg.ckpt_path
    if ckpt is None or str(ckpt).strip() in NO_CHECKPOINT:
        return None
    # a file, or under DeepSpeed a directory of per-rank shards (last.ckpt links to either)
    if ckpt == "last":
        last = Path(ckpt_dir) / "last.ckpt"
        if last.exists():
            check_resume_identity(last, identity)
            return str(last)
        log.info("ckpt_path=last but %s does not exist: starting fresh", last)
        return None
    if not Path(ckpt).exists():
        raise StageError(f"ckpt_path {ckpt!r} does not exist")
    # A directory is DeepSpeed's per-rank shards, which DeepSpeed unpickles whole (weights_only=False): only the
    # run's own are trusted. A file goes through Lightning with weights_only=True (`fit`).
    if Path(ckpt).is_dir() and not Path(ckpt).resolve().is_relative_to(Path(ckpt_dir).resolve()):
        raise StageError(f"ckpt_path {ckpt!r} is a DeepSpeed checkpoint directory outside this run's checkpoints "
                         f"({ckpt_dir}); DeepSpeed unpickles its files, which could run code, so only a run's own "
                         "are loaded (move it under that directory if you trust it, or use ckpt_path=last)")
    check_resume_identity(Path(ckpt), identity)
    return str(ckpt)


def check_resume_identity(path: Path, identity: dict) -> None:
    """ResumeGuard's check on a checkpoint file, before any model loads (its tensors are memory-mapped, not read)."""
    if path.is_dir():
        return
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True).get(ResumeGuard.KEY)
    except Exception:  # not readable this way: fit's own load says what is wrong with it
        return
    check_resume(saved, identity, f"checkpoint {path}")


def fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule, ckpt_path: str | None) -> None:
    """`trainer.fit`; a run stopped by SIGINT (Ctrl-C) or SIGTERM prints how to resume and exits with the shell's
    status for that signal (130, 143). Lightning handles both itself and exits from inside `fit` (status 1 after
    Ctrl-C, 0 after SIGTERM), so the message has to come from here."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        # tensors and plain containers only: a checkpoint that pickles other objects would run code as it loads
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise StageError(f"ckpt_path {ckpt_path}: refused to load, it holds pickled objects besides tensors and "
                         "plain types, and unpickling them could run code (zebra's own checkpoints hold none; give "
                         f"one of those, or ckpt_path=last): {str(err).splitlines()[0]}") from None
    except SystemExit as stop:
        if isinstance(stop, SIGTERMException):
            exit_interrupted(trainer, signal.SIGTERM)
        if trainer.interrupted:
            exit_interrupted(trainer, signal.SIGINT)
        raise
    finally:
        finish_loggers(trainer)
    if trainer.interrupted:
        raise StageError("training was interrupted; no export written (resume with ckpt_path=last)")
    restore_placement(trainer, module)


def exit_interrupted(trainer: pl.Trainer, signum: signal.Signals) -> None:
    """Say where the run stopped and how to resume it, then exit with status 128 + the signal's number."""
    ckpt = trainer.checkpoint_callback
    last = Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else None
    if last is not None and last.exists():
        resume = f"resume with ckpt_path=last ({last}, {_checkpoint_step(last)})"
    else:
        resume = ("no checkpoint was written yet, so ckpt_path=last starts again (set checkpoint_every_n_steps "
                  "for checkpoints)")
    if trainer.is_global_zero:
        print(f"{signum.name}: training stopped at step {trainer.global_step}, no export written; {resume}",
              file=sys.stderr, flush=True)
    sys.exit(128 + int(signum))


def _checkpoint_step(last: Path) -> str:
    """`last.ckpt` links to `step<N>.ckpt` (build_trainer's file names)."""
    name = last.resolve().stem
    return f"step {int(name[4:])}" if name.startswith("step") and name[4:].isdigit() else name


def restore_placement(trainer: pl.Trainer, module: nn.Module) -> None:
    """Put the trained module back where it trained. Lightning's teardown at the end of `fit` moves it to the
    CPU; the export, its probe forward and the KD held-out pass after fit expect it on the training device.
    Under ZeRO-3 the partitions (`ds_tensor`) never left the GPU, but the buffers (MLA's RoPE inverse
    frequencies) and the persistent small parameters did: a probe forward then mixed CUDA activations with CPU
    tensors."""
    device = trainer.strategy.root_device
    if device.type == "cpu":
        return
    if not zero.partitioned(module):
        module.to(device)
        return
    # Small parameters below DeepSpeed's persistence threshold (norm weights) are held whole by every rank in
    # `param.data`, which the teardown moved too; the others' `data` are empty placeholders (free to move).
    for p in module.parameters():
        if p.data.device != device:
            p.data = p.data.to(device)
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)


def finish_loggers(trainer: pl.Trainer) -> None:
    """Close each stage's wandb run, so the next stage of a pipeline gets a run of its own."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and getattr(lg, "_experiment", None) is not None:
            try:
                lg.experiment.finish()
            except Exception as err:  # never let logging break a finished training run
                log.warning("could not finish the wandb run: %s", err)
