"""Shared pytest set-up: the markers every test directory uses (DESIGN.md §6), and Triton's interpreter on
machines without a GPU.

`import torch` imports Triton (where it is installed), and Triton reads TRITON_INTERPRET when its own helpers
(`tl.zeros`, ...) are defined, so the variable must be set before the first `import torch` of the session: here,
at the top of the first conftest. Without a GPU the project's Triton kernels (zebra.model.flash_decode,
zebra.model.fused_conv_step) can only run interpreted; on a GPU machine they compile.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run on the lent GPU with -m gpu)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "slurm: starts a real single-node Slurm")
