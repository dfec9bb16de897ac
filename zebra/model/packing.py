"""Packed sequences: documents inside a batch row, marked by position ids that restart at 0.

Shared by the hybrid (MLA masking, Mamba2 state resets) and by the stages, which give the teacher the
same block-causal mask so its targets never see context the students cannot.
"""

from __future__ import annotations

import torch


def doc_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every token [B, T]: a new document starts wherever the position id is 0.

    With Hugging Face's left padding (pads at position 1, first real token at 0) the pads form document
    0 and the real tokens document 1, which is what a state reset wants anyway.
    """
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def is_packed(position_ids: torch.Tensor) -> bool:
    """True when some row holds more than one document (a position id 0 after the first column)."""
    return bool((position_ids[:, 1:] == 0).any())


def position_ids_from_doc_lengths(lengths: list[list[int]], seq_len: int, device=None) -> torch.Tensor:
    """Position ids for rows packed from documents of the given lengths (each row's lengths sum to seq_len)."""
    rows = []
    for row in lengths:
        if sum(row) != seq_len:
            raise ValueError(f"document lengths {row} do not fill a row of {seq_len} tokens")
        rows.append(torch.cat([torch.arange(n) for n in row]))
    return torch.stack(rows).to(device)


def block_causal_mask(doc_ids: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, T, T], True where query t may attend key s: s <= t, same document, key not a pad.

    Every token may attend itself, so a pad query's row is never empty (an all-False row gives NaN in SDPA).
    """
    t = doc_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    mask = causal[None] & same_doc
    if pad_mask is not None:
        mask = mask & pad_mask[:, None, :].bool()
        mask = mask | torch.eye(t, dtype=torch.bool, device=doc_ids.device)[None]
    return mask[:, None]
