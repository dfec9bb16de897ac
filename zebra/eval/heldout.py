"""Held-out perplexity and next-token KL(teacher || model), on two kinds of held-out data.

- "text": plain prose (zebra/data/shipped/heldout.txt by default, or any file), cut into rows of `seq_len`
  tokens, each scored on its own (zebra.compose.report's helpers, shared with the untrained-student report).
- "sft": the held-out split of the token mixture (chat conversations formatted with the chat template, packed with
  document boundaries), the split the KD stage measures its held-out KL on. Every model sees the packed rows as
  separate documents (the teacher through a block-causal mask, the hybrid through its position ids), and only the
  positions of the batch's loss_mask count.

Perplexity = exp(mean NLL of the next token); KL = mean over the same positions of sum_v p_t(v) log(p_t(v) / p_m(v)).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from zebra.compose.report import held_out_text, score_model, token_rows
from zebra.compose.smart import counted_positions, kl_sum, selected_log_probs

HELDOUT_SETS = ("text", "sft")


def text_rows(tokenizer, text: str | Path | None = None, seq_len: int = 512,
              max_tokens: int | None = 4096) -> tuple[list[torch.Tensor], str]:
    """Rows [1, <=seq_len] of the held-out text and a description of where it came from."""
    if isinstance(text, str) and Path(text).is_file():
        text = Path(text)
    body, source = held_out_text(text)
    rows = token_rows(tokenizer, body, seq_len, max_tokens)
    if not rows:
        raise ValueError(f"the held-out text ({source}) is too short to score")
    return rows, source


def score_text(model, teacher, rows: list[torch.Tensor]) -> dict:
    """{perplexity, nll, tokens, seconds[, kl_to_teacher]} over independent rows."""
    with torch.no_grad():
        return score_model(model, teacher, rows)


def sft_batches(tokenizer, data_cfg=None, seq_len: int = 512, batch_size: int = 2,
                max_batches: int | None = 8) -> tuple[list[dict], str]:
    """Batches of the token mixture's held-out split. `data_cfg`: a `data.sft` config node (Hydra, instantiated
    with the split and shapes), or None for the shipped mixture with its default split (conf/data/default.yaml)."""
    if data_cfg is not None:
        from hydra.utils import instantiate

        dm = instantiate(data_cfg, tokenizer=tokenizer, split="heldout", seq_len=int(seq_len),
                         batch_size=int(batch_size))
        names = [str(s.get("path") or s.get("name")) for s in data_cfg.get("sources", [])]
        source = f"data.sft ({', '.join(names)}, held-out split)"
    else:
        from zebra.data.sft import TokenMixtureDataModule

        dm = TokenMixtureDataModule(tokenizer=tokenizer, split="heldout", seq_len=int(seq_len),
                                    batch_size=int(batch_size))
        source = "shipped:sft (held-out split, seed 42, 5%)"
    batches = []
    for i, batch in enumerate(dm.heldout_dataloader(batch_size=int(batch_size))):
        if max_batches is not None and i >= int(max_batches):
            break
        batches.append(batch)
    if not batches:
        raise ValueError(f"the held-out split of {source} is empty")
    return batches, source


def _is_zebra(model) -> bool:
    return getattr(model.config, "model_type", None) == "zebra"


@torch.no_grad()
def score_batches(model, teacher, batches: list[dict]) -> dict:
    """{perplexity, nll, tokens, seconds[, kl_to_teacher]} over the counted positions of packed batches."""
    nll, kl, tokens, start = 0.0, 0.0, 0, time.perf_counter()
    for batch in batches:
        positions = counted_positions(batch).clone()
        positions[:, -1] = False  # no next token inside this row
        if not positions.any():
            continue
        logp = selected_log_probs(model, batch, positions, is_base=not _is_zebra(model))
        targets = batch["input_ids"][:, 1:][positions[:, :-1]].to(logp.device)
        nll -= float(logp.gather(-1, targets[:, None]).sum())
        if model is not teacher:
            kl += kl_sum(selected_log_probs(teacher, batch, positions, is_base=not _is_zebra(teacher)), logp)
        tokens += int(targets.numel())
    if tokens == 0:
        raise ValueError("the held-out batches hold no counted tokens")
    out = {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens,
           "seconds": round(time.perf_counter() - start, 2)}
    if model is not teacher:
        out["kl_to_teacher"] = kl / tokens
    return out
