"""Which kernels the model runs: ZebraConfig fields choose them (as transformers' `config._attn_implementation`
chooses attention), read by the layers on every call, so a change to `model.config` takes effect at the next one.

    field                  values                          default    environment override (tests, debugging)
    mamba_kernels          "auto" | "torch" | "mamba_ssm"  "auto"     ZEBRA_MAMBA_KERNELS=auto|torch|mamba_ssm
    fused_kernels          True | False                    True       ZEBRA_FUSED_KERNELS=1|0
    mla_decode_attention   "matmul" | "sdpa" | "triton"    "matmul"   -
    mla_absorb_max_tokens  int >= 0                        16         -

- mamba_kernels: "mamba_ssm" runs its Triton SSD scan, `selective_state_update` and gated RMSNorm (and
  causal-conv1d's conv where that is installed); "torch" our PyTorch scan, step and conv (ops/ssd.py); "auto" the
  first on CUDA where mamba_ssm imports, the second elsewhere. float64 always runs "torch": it is the reference
  precision, which the kernels do not take.
- fused_kernels: the project's Triton inference kernels (residual add + RMSNorm, the MLP's silu(gate) * up and,
  with the mamba_ssm backend, the Mamba2 state update and, where causal-conv1d is absent, the conv step). They
  have no backward, so they run only on CUDA tensors with gradients off, whatever the switch says.
- mla_decode_attention: the kernel of MLA's absorbed attention (ops/decode_attention.py).
- mla_absorb_max_tokens: MLA's absorbed form for calls of at most this many new tokens against a cache history
  (decode, short continuations); longer chunks (chunked prefill) materialise K/V, where the absorbed form would
  hold heads x tokens x cache scores.

An environment variable, where set, replaces its field for every model in the process; it is read on every call,
so a test can switch it between two forwards.
"""

from __future__ import annotations

import functools
import logging
import os
from types import SimpleNamespace

import torch

logger = logging.getLogger(__name__)

MAMBA_KERNELS = ("auto", "torch", "mamba_ssm")
DECODE_KERNELS = ("matmul", "sdpa", "triton")


@functools.lru_cache(maxsize=None)
def mamba_ssm_kernels():
    """mamba_ssm's Triton SSD scan, state update and gated RMSNorm, or None (never required on CPU)."""
    # Triton reads this when mamba_ssm's autotuners are built (at import): their choices are then kept on disk
    # beside the compiled kernels, so the next process on this machine (the next stage, a resumed run) skips the
    # minutes of autotuning a fresh machine pays. A value the user set (0 to re-tune) is kept.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # not installed, or installed but broken (triton/CUDA mismatch)
        if not isinstance(e, ImportError) or "mamba_ssm" not in str(e):
            logger.warning("mamba_ssm is present but failed to import (%s); using the PyTorch SSD scan", e)
        return None
    try:  # fused gate * norm (forward and backward in one pass each); older releases lack it
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    except Exception:
        rmsnorm_fn = None
    return SimpleNamespace(chunk_scan=mamba_chunk_scan_combined, state_update=selective_state_update,
                           gated_rmsnorm=rmsnorm_fn)


@functools.lru_cache(maxsize=None)
def causal_conv1d_kernels():
    """causal-conv1d's conv and conv step, or None."""
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:
        return None
    return SimpleNamespace(conv=causal_conv1d_fn, update=causal_conv1d_update)


def check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {list(allowed)}, got {value!r}")


def mamba_kernels(config) -> str:
    """`config.mamba_kernels`, or ZEBRA_MAMBA_KERNELS where set."""
    env = os.environ.get("ZEBRA_MAMBA_KERNELS", "").strip().lower()
    choice = env or config.mamba_kernels
    check_choice("ZEBRA_MAMBA_KERNELS" if env else "ZebraConfig.mamba_kernels", choice, MAMBA_KERNELS)
    return choice


def mamba_backend(config, device, dtype: torch.dtype | None = None) -> str:
    """The Mamba2 backend for tensors on `device` of `dtype`: "mamba_ssm" or "torch" (module docstring)."""
    choice = mamba_kernels(config)
    if choice == "torch" or dtype == torch.float64:
        return "torch"
    on_cuda = torch.device(device).type == "cuda"
    if choice == "mamba_ssm":
        if not on_cuda or mamba_ssm_kernels() is None:
            raise RuntimeError("mamba_kernels='mamba_ssm' needs a CUDA device and an importable mamba_ssm")
        return "mamba_ssm"
    return "mamba_ssm" if on_cuda and mamba_ssm_kernels() is not None else "torch"


def fused_kernels(config) -> bool:
    """`config.fused_kernels`, or ZEBRA_FUSED_KERNELS (1 or 0) where set."""
    env = os.environ.get("ZEBRA_FUSED_KERNELS", "").strip()
    if env:
        check_choice("ZEBRA_FUSED_KERNELS", env, ("0", "1"))
        return env == "1"
    return config.fused_kernels


def fused_inference(config, t: torch.Tensor | None = None) -> bool:
    """Whether a step takes the fused Triton kernels: no autograd (they have no backward), switched on, and `t` on
    CUDA (omitted where the caller has already chosen the GPU kernels, backend "mamba_ssm")."""
    return (t is None or t.is_cuda) and not torch.is_grad_enabled() and fused_kernels(config)


def decode_kernel(config) -> str:
    """`config.mla_decode_attention`, checked."""
    check_choice("ZebraConfig.mla_decode_attention", config.mla_decode_attention, DECODE_KERNELS)
    return config.mla_decode_attention
