"""Rotary position embeddings: the base Llama's frequencies and the two RoPE variants of MLA (METHOD.md §2.2).

- "pairs": the rope sub-vector is the d_rope/2 highest-frequency base rotary pairs, laid out as
  [base dims 0..d_rope/2-1, base dims hd/2..hd/2+d_rope/2-1] so that `rotate_half` pairs them exactly as
  the base does, rotated with the base's own (llama3-scaled) frequencies and no mscale.
- "reference": what the released checkpoints use: YaRN on a d_rope-dim grid, adjacent dims (2j, 2j+1)
  rotated together, and cos and sin both scaled by m = 0.1 ln(factor) + 1 (rope logits scaled by m^2).

Frequencies are computed in float64 from their definitions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------
# Base (Llama) inverse frequencies
# ---------------------------------------------------------------------------------------------------------


def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2: the frequency of rotary pair i."""
    return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama-3.1 context extension: long wavelengths are divided by `factor`, short ones kept, and the band
    in between interpolated smoothly in the ratio context / wavelength."""
    length = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = length / low_freq_factor  # wavelengths above this are fully interpolated
    high_freq_wavelen = length / high_freq_factor  # wavelengths below this are kept
    smooth = (length / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, smoothed)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, out)


def base_inv_freq(rope_parameters: dict, head_dim: int) -> torch.Tensor:
    """The base Llama's inverse frequencies [head_dim/2] (float64) for its `rope_parameters`."""
    theta = float(rope_parameters["rope_theta"])
    inv_freq = default_inv_freq(head_dim, theta)
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, float(rope_parameters["factor"]), float(rope_parameters["low_freq_factor"]),
                               float(rope_parameters["high_freq_factor"]),
                               int(rope_parameters["original_max_position_embeddings"]))
    raise ValueError(f"rope_type {rope_type!r} is not supported (default or llama3)")


# ---------------------------------------------------------------------------------------------------------
# YaRN (the reference MLA rope), DeepSeek-V2 style
# ---------------------------------------------------------------------------------------------------------


def yarn_correction_dim(num_rotations: float, dim: int, theta: float, original_length: int) -> float:
    """The (fractional) pair index whose wavelength fits `num_rotations` times into the original context."""
    return dim * math.log(original_length / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_correction_range(dim: int, theta: float, original_length: int, beta_fast: float = 32,
                          beta_slow: float = 1) -> tuple[int, int]:
    """Pair indices [low, high] between which YaRN blends from extrapolation to interpolation."""
    low = math.floor(yarn_correction_dim(beta_fast, dim, theta, original_length))
    high = math.ceil(yarn_correction_dim(beta_slow, dim, theta, original_length))
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(dim: int, theta: float, factor: float, original_length: int, beta_fast: float = 32,
                  beta_slow: float = 1) -> torch.Tensor:
    """YaRN inverse frequencies [dim/2] (float64).

    Pairs below `low` rotate many times within the original context (high frequency): they keep their
    frequency (`extra`, extrapolation). Pairs above `high` rotate less than once: they are divided by
    `factor` (`inter`, interpolation). A linear ramp in the pair index blends the two in between.
    """
    extra = default_inv_freq(dim, theta)
    inter = extra / factor
    low, high = yarn_correction_range(dim, theta, original_length, beta_fast, beta_slow)
    if low == high:
        high += 0.001  # avoid 0/0; the ramp is then a step at `low`
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return inter * ramp + extra * (1 - ramp)


def yarn_mscale(factor: float) -> float:
    """YaRN's attention temperature: multiplies cos and sin, so rope logits scale by its square."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def reference_rope_factor(rope_parameters: dict) -> float:
    """The YaRN factor the reference uses for a base: its llama3 factor, or 1 for a base without scaling."""
    if rope_parameters.get("rope_type", "default") == "llama3":
        return float(rope_parameters["factor"])
    return 1.0


# ---------------------------------------------------------------------------------------------------------
# Which base head dims become MLA's rope / nope dims
# ---------------------------------------------------------------------------------------------------------


def mla_rope_dims(variant: str, head_dim: int, d_rope: int) -> tuple[list[int], list[int]]:
    """(nope_dims, rope_dims): the base head dims that become MLA's nope and rope dims, in MLA order.

    "reference": nope = 0..d_nope-1, rope = hd-d_rope..hd-1.
    "pairs": rope = {0..d_rope/2-1} then {hd/2..hd/2+d_rope/2-1} (the highest-frequency rotary pairs,
    in `rotate_half` order); nope = every other dim, increasing.
    """
    if d_rope % 2 or not 0 < d_rope <= head_dim:
        raise ValueError(f"d_rope must be even and in (0, head_dim={head_dim}], got {d_rope}")
    if variant == "reference":
        return list(range(head_dim - d_rope)), list(range(head_dim - d_rope, head_dim))
    if variant == "pairs":
        half = head_dim // 2
        rope = list(range(d_rope // 2)) + list(range(half, half + d_rope // 2))
        chosen = set(rope)
        return [i for i in range(head_dim) if i not in chosen], rope
    raise ValueError(f"unknown MLA rope variant {variant!r} (pairs or reference)")


# ---------------------------------------------------------------------------------------------------------
# Applying the rotation
# ---------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim: dim i is paired with dim i + d/2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def interleaved_to_half(x: torch.Tensor) -> torch.Tensor:
    """[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]: adjacent pairs (2j, 2j+1) become (j, j + d/2)."""
    d = x.shape[-1]
    return x.unflatten(-1, (d // 2, 2)).transpose(-1, -2).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class MLARotaryEmbedding(nn.Module):
    """cos/sin for MLA's d_rope dims from position ids, and their application, for one rope variant.

    `inv_freq` is a non-persistent float64 buffer (it follows the module across devices and never enters a
    checkpoint); `reset_inv_freq()` refills it, for loaders that build the model on the meta device.
    The "reference" variant permutes its inputs interleaved-to-half before `rotate_half`, exactly as the
    released implementation does, so its rotated vectors (and the cached rope key) are in half layout.
    """

    def __init__(self, config):
        super().__init__()
        self.variant = config.mla_rope
        self.d_rope = config.qk_rope_head_dim
        rp = config.rope_parameters
        if self.variant == "pairs":
            self.mscale = 1.0
        else:
            self.factor = reference_rope_factor(rp)
            self.theta = float(rp["rope_theta"])
            self.original_length = int(rp.get("original_max_position_embeddings", config.max_position_embeddings))
            self.mscale = yarn_mscale(self.factor)
        self.rope_parameters = dict(rp)
        self.head_dim = config.head_dim
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        if self.variant == "pairs":
            # The base's own (possibly llama3-scaled) frequencies of its d_rope/2 highest-frequency pairs.
            return base_inv_freq(self.rope_parameters, self.head_dim)[: self.d_rope // 2]
        return yarn_inv_freq(self.d_rope, self.theta, self.factor, self.original_length)

    @torch.no_grad()
    def reset_inv_freq(self) -> None:
        self.inv_freq.copy_(self.compute_inv_freq())

    def _apply(self, fn, recurse=True):
        # `.to(torch.bfloat16)` would cast inv_freq too, and bf16 frequencies put the angles of late
        # positions far off; recompute it in float64 after any such cast.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float64:
            self.inv_freq = self.compute_inv_freq().to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, d_rope] in `dtype`; angles in float32 (float64 when dtype is float64), as HF Llama."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        angles = position_ids[..., None].to(compute) * self.inv_freq.to(compute)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if self.mscale != 1.0:  # ("pairs" has none: skip two kernels per call)
            cos, sin = cos * self.mscale, sin * self.mscale
        return cos.to(dtype), sin.to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [..., T, d_rope]; cos/sin must broadcast against it."""
        if self.variant == "reference":
            x = interleaved_to_half(x)
        return apply_rotary(x, cos, sin)
