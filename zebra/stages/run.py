"""`cfg.stage.name` -> runner. Each runner takes the whole composed config and returns its report (a dict)."""

from __future__ import annotations

import importlib
import json
import logging
import os

from omegaconf import DictConfig

from zebra.errors import ConfigError

# besides the stages of the graph (zebra.stages.artifacts.STAGES), each run as zebra.stages.<name>.run
RUNNERS = {
    "pipeline": "zebra.stages.pipeline:run",
    "describe": "zebra.plan.describe:describe",
    "eval": "zebra.eval.evaluate:run_eval",
}

log = logging.getLogger("zebra")


def runner(name: str):
    from zebra.stages.artifacts import STAGES  # imported here: torch and Lightning load after run() set the env

    runners = {**{stage: f"zebra.stages.{stage}:run" for stage in STAGES}, **RUNNERS}
    if name not in runners:
        raise ConfigError(f"unknown stage {name!r} (choose one of {sorted(runners)}: stage=<name>)")
    module, fn = runners[name].split(":")
    return getattr(importlib.import_module(module), fn)


def run(cfg: DictConfig) -> dict:
    # Quiet, offline-safe defaults before torch/lightning/wandb import.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    name = cfg.stage.name
    fn = runner(name)
    from zebra.stages.validate import validate

    validate(cfg)  # the whole run, in seconds, before any model, teacher or data loads
    if name == "describe":
        out = fn(cfg)
        print(json.dumps(out, default=str))
        return out
    import lightning.pytorch as pl

    from zebra.stages.trainer import set_threads

    set_threads(cfg.num_threads)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    out = fn(cfg)
    close_process_group()  # on success only: a failed rank must exit, not wait at a barrier the others never reach
    return out


def close_process_group() -> None:
    """Wait for every rank, then take the process group down: a rank that exits while rank 0 still writes the
    export would otherwise tear down its communication threads under the others (seen as SIGABRT,
    "terminate called without an active exception", under DeepSpeed on CPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
