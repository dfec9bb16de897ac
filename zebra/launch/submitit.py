"""What zebra adds to Hydra's submitit launchers (`hydra/launcher=submitit_slurm | submitit_local`).

The launcher classes themselves live in `hydra_plugins/zebra_launcher` (Hydra instantiates launchers only from
the `hydra_plugins` package) and call the functions here:

- `prepare_launch` (submitting process): one task per device (DESIGN §5; the yaml takes tasks_per_node and nodes
  from the trainer) and `gpus_per_node: null` = trainer.devices on GPU. Jobs run the submitting interpreter, in
  whose environment zebra is installed, so they unpickle the launcher whatever directory they were submitted from.
- `prepare_job` (each task of a job, before Hydra composes the job's config): zebra's OmegaConf resolvers are
  registered (the job never imports train.py); a job that Slurm restarted (`SLURM_RESTART_COUNT > 0`: requeued
  by submitit, preempted in REQUEUE mode, node failure) gets `ckpt_path=last`; under submitit's local executor
  with several tasks, the torch.distributed variables are exported so that Lightning sees processes started by a
  launcher instead of starting its own.
- `resubmission` (submitit's signal handler on rank 0, USR2): the same job again, with `ckpt_path=last`.

Requeue has one owner, submitit (docs/clusters.md): Lightning's SLURM auto-requeue is switched off by
`zebra.launch.trainer.cluster_plugins`.
"""

from __future__ import annotations

import os
from typing import Any

from zebra.launch import restart_count, with_resume

GPU_ACCELERATORS = ("gpu", "cuda")


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
        return int(value)
    raise ValueError(f"{what} must be a positive number of devices for a cluster launcher, got {value!r} "
                     "(one task is started per device; set it explicitly, e.g. trainer.devices=8)")


def resolve_resources(params: dict, trainer_cfg) -> dict:
    """Launcher resources checked against the trainer: one task per device (tasks_per_node, nodes), and
    gpus_per_node left null means trainer.devices on GPU, none on CPU."""
    params = dict(params)
    trainer_cfg = trainer_cfg or {}
    devices = trainer_cfg.get("devices", 1)
    accelerator = str(trainer_cfg.get("accelerator", "cpu"))
    params["tasks_per_node"] = _count(params.get("tasks_per_node", devices), "hydra.launcher.tasks_per_node")
    params["nodes"] = _count(params.get("nodes", trainer_cfg.get("num_nodes", 1)), "hydra.launcher.nodes")
    if params.get("gpus_per_node") is None and accelerator in GPU_ACCELERATORS:
        params["gpus_per_node"] = _count(devices, "trainer.devices")
    return params


def prepare_launch(launcher) -> None:
    """Called in the submitting process before the jobs are submitted."""
    trainer_cfg = launcher.config.get("trainer") if launcher.config is not None else None
    launcher.params = resolve_resources(launcher.params, trainer_cfg)


def export_local_distributed_env() -> None:
    """submitit's local executor starts `tasks_per_node` processes but tells them only its own SUBMITIT_LOCAL_*
    variables; export MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK so Lightning (and torch.distributed) see
    processes started by a launcher. CUDA_VISIBLE_DEVICES is left alone: Lightning picks the device by local rank."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks > 1 and "LOCAL_RANK" not in os.environ:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def prepare_job(executor: str, sweep_overrides: list[str]) -> list[str]:
    """Called in every task of a job before Hydra composes its config; returns the job's overrides."""
    from zebra.launch.resolvers import register_resolvers

    register_resolvers()
    if executor == "local":
        export_local_distributed_env()
    if restart_count() > 0:
        sweep_overrides = with_resume(list(sweep_overrides))
    return list(sweep_overrides)


def resubmission(launcher, args: tuple, kwargs: dict):
    """submitit's `checkpoint` hook: the same Hydra job (same overrides, job number and sweep directory, hence the
    same artifact directories), resuming from its last checkpoint."""
    import submitit

    sweep_overrides, *rest = args
    return submitit.helpers.DelayedSubmission(launcher, with_resume(list(sweep_overrides)), *rest, **kwargs)
