"""Lightning's DeepSpeedStrategy, also on CPU processes.

Lightning refuses DeepSpeed on anything but CUDA. DeepSpeed itself runs on CPU (its CPU accelerator, gloo), which
is how the ZeRO-2/3 code paths of the stages (sharded creation, gathered export, weights that really train) are
tested on machines without a GPU. On GPUs this is exactly Lightning's strategy.
"""

from __future__ import annotations

import argparse

from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.fabric.utilities.seed import reset_seed

from zebra.launch.build_locks import check_build_locks


class ZebraDeepSpeedStrategy(DeepSpeedStrategy):
    strategy_name = "zebra_deepspeed"

    def setup_environment(self) -> None:
        # before DeepSpeed compiles any op: a lock left by a killed build would make it wait forever, silently
        check_build_locks()
        if isinstance(self.accelerator, CPUAccelerator):
            DDPStrategy.setup_environment(self)  # skips only Lightning's CUDA-only check
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):  # CPU devices have no index to check against ranks
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return
        super().setup_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not isinstance(self.accelerator, CPUAccelerator):
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # Lightning passes the device index as DeepSpeed's rank; a CPU device has none, so pass the local rank.
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer

    @property
    def zero_stage(self) -> int:
        self._init_config_if_needed()
        return int((self.config or {}).get("zero_optimization", {}).get("stage", 0))
