"""Held-out metrics: next-token perplexity and mean per-token forward KL(teacher || model), over batches.

Pure PyTorch and the models (no Lightning, Hydra, zebra.stages or zebra.compose), so that every caller can use it:
the KD stage's held-out KL, SMART's sensitivities, the untrained-student report and the evaluation.

A batch holds input_ids [B, T] and optionally position_ids (packed documents restart at 0), attention_mask (right
padding) and loss_mask. Position t counts when loss_mask[t] (without one: every real token whose next token is real)
and predicts input_ids[t + 1]. A zebra hybrid takes the position ids and the 2-D mask itself; any other model (the
Llama teacher) gets the block-causal 4-D mask of zebra.model.packing, so that both see the same documents.

Logits exist for the counted positions only, a chunk of rows at a time (about 2^26 fp32 values per chunk);
softmaxes and sums are at least fp32. Perplexity = exp(mean NLL of the next token); KL = mean over the same
positions of sum_v p_t(v) (log p_t(v) - log p_m(v)).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from zebra.model.packing import packed_attention_mask
from zebra.plan.chunks import chunk_rows

def counted_positions(batch: dict) -> torch.Tensor:
    """Bool [B, T]: the positions whose next-token distribution counts (loss_mask; else every real token but
    the last of its row)."""
    if batch.get("loss_mask") is not None:
        return batch["loss_mask"].bool()
    ids = batch["input_ids"]
    pad = batch.get("attention_mask")
    real = pad.bool() if pad is not None else torch.ones_like(ids, dtype=torch.bool)
    keep = real.clone()
    keep[:, :-1] &= real[:, 1:]  # the next token must be real too
    keep[:, -1] = False
    return keep


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits -> fp32 for the softmax; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype.itemsize < 4 else x


def _is_zebra(model) -> bool:
    return getattr(model.config, "model_type", None) == "zebra"


def forward_inputs(model, batch: dict) -> dict:
    """Keyword arguments for `model.model` (the decoder without its LM head) on `batch`, moved to the model's
    device: the hybrid gets position ids and the 2-D mask, any other model the packed 4-D mask."""
    device = model.model.embed_tokens.weight.device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    if not _is_zebra(model):
        kwargs["attention_mask"] = packed_attention_mask(
            batch.get("position_ids"), batch.get("attention_mask"), model.model.embed_tokens.weight.dtype,
            getattr(model.config, "_attn_implementation", "sdpa"))
    elif batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    return kwargs


def log_probs(model, hidden: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """log-softmax next-token distributions [N, V] (at least fp32) from final hidden states [N, H]."""
    chunk = chunk or chunk_rows(model.config.vocab_size)
    return torch.cat([F.log_softmax(at_least_fp32(model.lm_head(h)), dim=-1) for h in hidden.split(chunk)])


def log_probs_at(model, hidden: torch.Tensor, positions: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`log_probs` of the hidden states [B, T, H] at the counted positions [B, T] only."""
    return log_probs(model, hidden[positions.to(hidden.device)], chunk)


@torch.no_grad()
def selected_log_probs(model, batch: dict, positions: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """log-softmax next-token distributions [N, V] of `model` on `batch` at the counted positions: the LM head
    runs on the selected hidden states only, so full [B, T, V] logits are never materialised."""
    hidden = model.model(**forward_inputs(model, batch)).last_hidden_state
    return log_probs_at(model, hidden, positions, chunk)


def kl_sum(logp_ref: torch.Tensor, logp: torch.Tensor) -> float:
    """sum over tokens of KL(p_ref || p) (forward KL) from log-probabilities [N, V]."""
    logp_ref = logp_ref.to(logp.device)  # the teacher may sit on another device than the model
    return float((logp_ref.exp() * (logp_ref - logp)).sum())


@contextmanager
def eval_mode(*models):
    """The models in eval mode for the block; their previous modes restored after it."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@torch.no_grad()
def score_batches(model, teacher, batches, chunk: int | None = None) -> dict:
    """{perplexity, nll, tokens, seconds[, kl_to_teacher]} over the counted positions of `batches` (KL omitted
    when `model` is the teacher). Raises ValueError when the batches hold no counted position."""
    nll, kl, tokens, start = 0.0, 0.0, 0, time.perf_counter()
    chunk = chunk or chunk_rows(model.config.vocab_size)
    with eval_mode(model, teacher):
        for batch in batches:
            positions = counted_positions(batch).clone()
            positions[:, -1] = False  # no next token inside this row
            if not positions.any():
                continue
            hidden = model.model(**forward_inputs(model, batch)).last_hidden_state
            hidden = hidden[positions.to(hidden.device)]
            targets = batch["input_ids"][:, 1:][positions[:, :-1]].to(hidden.device)
            if model is not teacher:
                t_hidden = teacher.model(**forward_inputs(teacher, batch)).last_hidden_state
                t_hidden = t_hidden[positions.to(t_hidden.device)]
            for i in range(0, hidden.shape[0], chunk):
                logp = log_probs(model, hidden[i:i + chunk], chunk)
                nll -= float(logp.gather(-1, targets[i:i + chunk, None]).sum())
                if model is not teacher:
                    kl += kl_sum(log_probs(teacher, t_hidden[i:i + chunk], chunk), logp)
            tokens += int(targets.numel())
    if tokens == 0:
        raise ValueError("the held-out batches hold no counted tokens")
    out = {"perplexity": math.exp(nll / tokens), "nll": nll / tokens, "tokens": tokens,
           "seconds": round(time.perf_counter() - start, 2)}
    if model is not teacher:
        out["kl_to_teacher"] = kl / tokens
    return out


def heldout_kl(model, teacher, batches, chunk: int | None = None) -> float | None:
    """Mean per-token KL(teacher || model) over the counted positions of `batches`; None when there are none."""
    batches = list(batches)
    if not any(bool(counted_positions(b)[:, :-1].any()) for b in batches):
        return None
    return score_batches(model, teacher, batches, chunk)["kl_to_teacher"]
