"""How zebra's processes are started and restarted (DESIGN.md §5): one process per device, started by a launcher
(torchrun, srun, submitit with `tasks_per_node = devices`), never by Lightning re-executing `train.py`; and
Slurm requeue owned by submitit (docs/clusters.md).

Here: what both sides need and what OmegaConf resolves (`launch_stamp`, registered by
zebra.launch.resolvers), without Lightning. The Lightning side (trainer plugin, step-trace
callbacks) is `zebra.launch.trainer`; what the submitit launchers add is `zebra.launch.submitit`, called from the
launcher classes in `hydra_plugins/zebra_launcher` (which Hydra imports at every start-up, so they import zebra
only when they launch).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

# conf/hydra/launcher/submitit_{slurm,local}.yaml keep the names users know from hydra-submitit-launcher, so Hydra
# validates them against that plugin's schema of the same name (typed keys, which we want) and warns that such
# automatic matching is deprecated; that one warning is expected and says nothing to a user.
warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/submitit_(slurm|local)' is validated against "
                        r"ConfigStore schema", category=UserWarning)

# Values of `ckpt_path` that mean "no checkpoint given", as a command-line override spells them (the stages'
# zebra.stages.trainer.resolve_ckpt_path reads the same, besides None).
NO_CHECKPOINT = ("", "null", "none", "None", "~")


def restart_count() -> int:
    """How many times Slurm restarted this job (requeue, node failure, preemption in REQUEUE mode); 0 elsewhere."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def with_resume(overrides: list[str]) -> list[str]:
    """Hydra overrides of a job that is started again after a requeue: `ckpt_path=last` added, so the stage resumes
    from `<stage dir>/checkpoints/last.ckpt` (a fresh start when the first attempt never reached a checkpoint).

    An explicit checkpoint path given by the user is kept; `ckpt_path=null` (or none given) becomes `last`.
    """
    out, has_path = [], False
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "ckpt_path":
            value = value.strip().strip("'\"")  # ckpt_path='' on the command line: Hydra's empty string
            if value not in NO_CHECKPOINT and value != "last":
                has_path = True
                out.append(o)
            continue
        out.append(o)
    if not has_path:
        out.append("ckpt_path=last")
    return out


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of a process (Linux /proc), None when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); fields[0] is field 3
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def launch_stamp(fmt: str = "%Y-%m-%d/%H-%M-%S") -> str:
    """Name of Hydra's run directory, identical in every process of one launch (Hydra's own `${now:}` can differ
    by a second between ranks that torchrun or srun start, which would make one run directory per rank):

    - under torchrun: the start time of the torchrun agent, the parent of every local rank;
    - in a Slurm job step with several tasks (srun): `slurm-<job id>` (also stable across requeues);
    - otherwise: now.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        started = _process_start_time(os.getppid())
        if started is not None:
            return time.strftime(fmt, time.localtime(started))
    job = os.environ.get("SLURM_JOB_ID")
    if job and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in os.environ:
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else job
        return f"slurm-{job}"
    return time.strftime(fmt)
