"""zebra's Hydra launchers: hydra-submitit-launcher's Slurm and local launchers plus what zebra needs for one
process per device and requeue-and-resume (zebra/launch/submitit.py; docs/clusters.md).

They live here because Hydra instantiates launcher plugins only from the `hydra_plugins` namespace package; the
logic is in `zebra.launch.submitit`, imported lazily so that Hydra's plugin scan stays fast.
"""

from typing import Any, List, Sequence

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher


class _ZebraSubmitit:
    """Mixed in before the submitit launcher class, whose `_EXECUTOR` ("slurm" | "local") it uses."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from zebra.launch.submitit import prepare_launch

        prepare_launch(self)
        return super().launch(job_overrides, initial_job_idx)

    def __call__(self, sweep_overrides: List[str], *args: Any, **kwargs: Any):
        from zebra.launch.submitit import prepare_job

        return super().__call__(prepare_job(self._EXECUTOR, sweep_overrides), *args, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any):
        from zebra.launch.submitit import resubmission

        return resubmission(self, args, kwargs)


class ZebraSlurmLauncher(_ZebraSubmitit, SlurmLauncher):
    """`hydra/launcher=submitit_slurm`."""


class ZebraLocalLauncher(_ZebraSubmitit, LocalLauncher):
    """`hydra/launcher=submitit_local`."""
