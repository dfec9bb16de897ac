"""What the project's Triton kernels (flash_decode, fused_norm, fused_mlp, fused_conv_step, fused_state_update)
share: Triton's interpreter, block sizes, and the one place that imports Triton."""

from __future__ import annotations

import os

import torch


def next_pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= n and >= lo (Triton block sizes)."""
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def prev_pow2(n: int) -> int:
    """The largest power of two <= n (1 for n < 1)."""
    return 1 << (max(1, n).bit_length() - 1)


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
