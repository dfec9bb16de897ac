"""What the project's Triton kernels (flash_decode, fused_norm, fused_conv_step, fused_state_update) share: the
switch for the fused inference kernels, Triton's interpreter, and the one place that imports Triton."""

from __future__ import annotations

import os

import torch


def fused_kernels_enabled() -> bool:
    """The fused inference kernels: on unless ZEBRA_FUSED_KERNELS=0, which gives the eager path (for
    before/after measurements)."""
    return os.environ.get("ZEBRA_FUSED_KERNELS", "1") != "0"


def interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, how the tests check them."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def import_triton():
    """(triton, triton.language). Imported when a kernel is first built, so that TRITON_INTERPRET set by a caller
    takes effect; in a try block, so that transformers' remote-code loader does not require Triton to load an
    export."""
    try:
        import triton
        import triton.language as tl
    except ImportError as err:
        raise RuntimeError("this kernel needs Triton (on GPUs it comes with torch)") from err
    return triton, tl


def require_kernel_device(t: torch.Tensor, name: str) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"{name} runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
