"""Packed sequences: documents inside a batch row, marked by position ids that restart at 0.

Shared by the hybrid (MLA masking, Mamba2 state resets) and by everything that runs a Llama teacher beside
it (the stages, SMART, held-out metrics), which gives the teacher the same block-causal mask
(`packed_attention_mask`) so its outputs never see context the students cannot.
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


def packed_attention_mask(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                          dtype: torch.dtype = torch.float32, attn_implementation: str | None = "sdpa"
                          ) -> torch.Tensor | None:
    """The 4-D mask that gives a Hugging Face Llama (a teacher or base) the hybrid's view of a packed, possibly
    right-padded batch: queries attend keys of their own document only, never padding.

    transformers' `create_causal_mask` passes a 4-D mask through as given. SDPA takes it boolean (True = attend);
    eager attention adds it, so it gets 0 / finfo.min floats. None when every row is one unpadded document
    (plain causal attention, the fastest path). `position_ids` None: one document per row.
    """
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    packed = position_ids is not None and is_packed(position_ids)
    if not padded and not packed:
        return None
    if position_ids is not None:
        doc_ids = doc_ids_from_position_ids(position_ids)
    else:
        doc_ids = torch.zeros(attention_mask.shape, dtype=torch.int32, device=attention_mask.device)
    mask = block_causal_mask(doc_ids, attention_mask if padded else None)
    impl = attn_implementation or "sdpa"
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if impl != "sdpa":
        raise ValueError(f"attention implementation {impl!r} cannot take a packed (document-causal) mask; "
                         "use sdpa or eager")
    return mask
