"""Attention for a few queries against a long cache (MLA's absorbed decode), by one of three kernels; the config
field `mla_decode_attention` picks which (ops/dispatch.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import DECODE_KERNELS, check_choice
from .flash_decode import flash_decode

DECODE_SPLITS, DECODE_SPLIT_MIN = 16, 4096  # "matmul": key ranges of the values GEMM, from this many keys


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     kernel: str = "matmul") -> torch.Tensor:
    """softmax(scale * q k^T, masked) v for few queries against many keys -> [B, G, Q, Dv].

    q [B, G, Q, D], k [B, G, S, D], v [B, G, S, Dv]: G key/value heads, each with the Q query rows that read it
    (query heads folded into rows, so no GQA repeat is needed). mask: bool, broadcastable to [B, G, Q, S], True =
    attend (every row must see at least one key), or None.
    - "sdpa": torch's fused attention. With a mask that is its memory-efficient kernel, one thread block per
      (batch, head, block of query rows): few blocks when batch x heads is small.
    - "matmul": two batched GEMMs around a softmax (scores in q's dtype, the softmax accumulating in fp32, as
      transformers' eager attention). The scores GEMM spreads the long key axis over the whole GPU; the
      probabilities x values GEMM reduces over it, so for long S it is split into DECODE_SPLITS key ranges
      (more, smaller GEMMs in one batch) whose partial outputs are summed.
    - "triton": `flash_decode`, split-key attention with an online softmax that reads the keys and
      values once (CUDA; on CPU only under Triton's interpreter).
    """
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if kernel == "triton":
        return flash_decode(q, k, v, mask, scale)
    check_choice("decode attention kernel", kernel, DECODE_KERNELS)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    b, g, nq, s = probs.shape
    n = DECODE_SPLITS
    if s < DECODE_SPLIT_MIN or s % n:
        return torch.matmul(probs, v)
    parts = torch.matmul(probs.view(b, g, nq, n, s // n).transpose(2, 3), v.unflatten(2, (n, s // n)))
    return parts.sum(2)  # [B, G, n, Q, Dv] -> [B, G, Q, Dv]
