"""Losses shared by the stages: chunked forward-KL for KD (METHOD §6), its sparse form over a teacher cache's top-k,
and the sigmoid DPO loss (METHOD §7).

The KD loss never holds full-vocabulary logits of all tokens: it takes the final hidden states of student
and teacher and both LM-head weights, and walks over token chunks. Each chunk's logits, log-probs and the
gradient of the loss w.r.t. the student's chunk logits live only while that chunk is processed; the
gradient is pushed through the LM head at once (into `grad_hidden [N, H_s]` and, when the head trains, an
fp32 `grad_weight [V, H_s]`), so the backward pass only scales stored gradients and no chunk is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zebra.stages.errors import StageError

# elements of one chunk's [tokens, vocab] fp32 logits; ~256 MB, i.e. 512 tokens at a 128k vocabulary
_DEFAULT_CHUNK_ELEMENTS = 1 << 26


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head weight the chunked losses multiply by (they never call the head's own forward)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model.lm_head
    if getattr(head, "bias", None) is not None:
        raise StageError("the chunked KD loss assumes an LM head without bias")
    return head.weight


def auto_chunk_size(vocab_size: int, chunk_elements: int = _DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk so that one chunk's fp32 logits hold about `chunk_elements` values."""
    n = max(1, chunk_elements // max(1, vocab_size))
    return 1 << (n.bit_length() - 1)  # a power of two: friendlier matmul shapes


class _ChunkState:
    """What both chunked losses keep across their token chunks: the softmax / accumulation dtype, the LM-head weight
    the matmuls use, the running KL and CE sums and the gradients already pushed through the head."""

    def __init__(self, ctx, hs: torch.Tensor, ws: torch.Tensor, need_h: bool, need_w: bool):
        ctx.w_dtype = ws.dtype
        self.acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
        self.grad_h = torch.zeros_like(hs) if need_h else None
        self.grad_w = torch.zeros(ws.shape, dtype=self.acc, device=ws.device) if need_w else None
        self.kl = torch.zeros((), dtype=self.acc, device=hs.device)
        self.ce = torch.zeros((), dtype=self.acc, device=hs.device)
        # Matmuls run in the activations' dtype (bf16 under bf16 training; autocast, when on, casts by itself);
        # outside autocast a weight of another dtype (fp32 master weights) is cast once for the call.
        self.autocast = torch.is_autocast_enabled(hs.device.type)
        self.ws_mm = ws if self.autocast or ws.dtype == hs.dtype else ws.to(hs.dtype)
        self.mm_dtype = torch.get_autocast_dtype(hs.device.type) if self.autocast else hs.dtype
        self.needs_grad = need_h or need_w

    def add_ce(self, logp1: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds the chunk's CE (student log-probs at T=1 against labels, -100 = ignored); returns (safe labels, valid)."""
        valid = labels != -100
        safe = labels.clamp_min(0)
        self.ce += (-logp1.gather(-1, safe[:, None]).squeeze(-1) * valid).sum()
        return safe, valid

    def push(self, g_lp: torch.Tensor, hs_c: torch.Tensor, start: int, end: int) -> None:
        """The chunk's logit gradient (already in the matmul dtype: the rounding autograd applies) through the head."""
        if self.grad_h is not None:
            self.grad_h[start:end] = (g_lp @ self.ws_mm).to(self.grad_h.dtype)
        if self.grad_w is not None:
            self.grad_w.add_((g_lp.t() @ hs_c).to(self.acc))

    def finish(self, ctx, temperature: float, kl_weight: float, ce_weight: float, use_ce: bool):
        loss = kl_weight * temperature ** 2 * self.kl
        if use_ce:
            loss = loss + ce_weight * self.ce
        ctx.save_for_backward(self.grad_h, self.grad_w)
        ctx.mark_non_differentiable(self.kl, self.ce)
        return loss, self.kl, self.ce


def _add_ce_grad(g: torch.Tensor, logp1: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor,
                 ce_weight: float) -> None:
    """d CE / d z_s = softmax(z_s) - onehot(label), only where labelled, added to the chunk's logit gradient g."""
    p1 = logp1.exp()
    p1[torch.arange(p1.shape[0], device=p1.device), safe] -= 1.0
    g.add_(p1.mul_(valid[:, None].to(p1.dtype)), alpha=ce_weight)


def _head_grads(ctx, grad_loss: torch.Tensor):
    """Backward of both chunked losses: the stored gradients scaled by the incoming one."""
    grad_h, grad_w = ctx.saved_tensors
    gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
    gw = (grad_w * grad_loss).to(ctx.w_dtype) if grad_w is not None else None
    return gh, gw


def _no_tokens(hs: torch.Tensor, ws: torch.Tensor):
    """The loss of a batch with no counted token: zero, still connected to the student's graph."""
    zero = (hs.sum() * 0.0) + (ws.sum() * 0.0)
    return zero, {"kl": zero.detach(), "ce": zero.detach(), "tokens": torch.tensor(0)}


def _reduce(loss, kl_sum, ce_sum, n_tok: int, lab, reduction: str, num_sequences, num_tokens):
    """The summed loss divided as `reduction` says, and the per-token stats (chunked_kd_loss's contract)."""
    if reduction == "sequence":
        denom = float(num_sequences or 1)
    elif reduction == "token":
        denom = num_tokens if num_tokens is not None else float(n_tok)
    elif reduction == "sum":
        denom = 1.0
    else:
        raise ValueError(f"reduction must be 'sequence', 'token' or 'sum', got {reduction!r}")
    n_lab = (lab != -100).sum().clamp_min(1) if lab is not None else torch.tensor(1)
    stats = {"kl": kl_sum / n_tok, "ce": ce_sum / n_lab.to(ce_sum), "tokens": torch.tensor(n_tok)}
    return loss / denom, stats


class _ChunkedKD(torch.autograd.Function):
    """Sum over tokens of kl_weight * T^2 * KL(p_t^T || p_s^T) + ce_weight * CE(student at T=1, label).

    Returns (loss_sum, kl_sum, ce_sum); only loss_sum is differentiable (w.r.t. student hidden and weight).
    """

    @staticmethod
    def forward(ctx, hs, ht, ws, wt, labels, temperature, kl_weight, ce_weight, chunk_size):
        st = _ChunkState(ctx, hs, ws, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        acc, n = st.acc, hs.shape[0]
        inv_t = 1.0 / temperature
        use_ce = ce_weight != 0.0 and labels is not None
        if not st.autocast and wt.dtype != ht.dtype:
            wt = wt.to(ht.dtype)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            hs_c = hs[start:end]
            # logits in the inputs' dtype (bf16 matmul under bf16 training), then fp32 for the softmaxes
            zs = (hs_c @ st.ws_mm.t()).to(acc)
            zt = (ht[start:end] @ wt.t()).to(acc)
            logp_t = torch.log_softmax(zt.mul_(inv_t), dim=-1)
            del zt
            logp_s = torch.log_softmax(zs * inv_t if inv_t != 1.0 else zs, dim=-1)
            p_t = logp_t.exp()
            # KL(p_t || p_s) = sum p_t (log p_t - log p_s); p_t = 0 rows contribute 0 (as kl_div's log_target)
            st.kl += (p_t * (logp_t - logp_s)).sum()
            del logp_t
            if use_ce:
                logp1 = logp_s if inv_t == 1.0 else torch.log_softmax(zs, dim=-1)
                safe, valid = st.add_ce(logp1, labels[start:end])
            if st.needs_grad:
                # d/dz_s of T^2 * KL(p_t^T || softmax(z_s / T)) = T * (p_s^T - p_t^T)
                g = (logp_s.exp() - p_t).mul_(kl_weight * temperature)
                if use_ce:
                    _add_ce_grad(g, logp1, safe, valid, ce_weight)
                del p_t, logp_s, zs
                g_lp = g.to(st.mm_dtype)
                del g
                st.push(g_lp, hs_c, start, end)
                del g_lp
        return st.finish(ctx, temperature, kl_weight, ce_weight, use_ce)

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        gh, gw = _head_grads(ctx, grad_loss)
        return gh, None, gw, None, None, None, None, None, None


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    reduction: str = "sequence",
    num_sequences: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward KL(p_teacher || p_student) over the vocabulary from final hidden states, in token chunks.

    student_hidden [N, H_s] or [B, T, H_s] (after the student's final norm), teacher_hidden likewise with
    H_t, student_weight [V, H_s] and teacher_weight [V, H_t] (the LM heads, no bias). `mask` (same leading
    shape, bool) keeps the tokens whose next-token distribution counts; `labels` (same leading shape, -100 =
    ignore) feed the optional CE term `ce_weight * CE(student logits at T=1, labels)`. The KL term is
    `kl_weight * T^2 * KL` at temperature T (T^2 keeps gradient scale independent of T).

    reduction: "sequence" = sum over tokens / number of sequences (METHOD §6; `num_sequences` defaults to B
    for 3-D input, else 1), "token" = mean over counted tokens (over `num_tokens` when given: under data
    parallelism, this rank's share of the global batch's counted tokens), "sum" = plain sum.
    Returns (loss, {"kl": mean KL per counted token, "ce": mean CE per labelled token, "tokens": count}).
    """
    if student_hidden.dim() == 3 and num_sequences is None:
        num_sequences = student_hidden.shape[0]
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    if hs.shape[0] != ht.shape[0]:
        raise ValueError(f"student has {hs.shape[0]} tokens but teacher has {ht.shape[0]}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student vocabulary ({student_weight.shape[0]}) differs from teacher's "
                         f"({teacher_weight.shape[0]}): KD needs the same tokenizer")
    lab = labels.reshape(-1) if labels is not None else None
    if mask is not None:
        idx = mask.reshape(-1).nonzero().squeeze(-1)
        hs, ht = hs.index_select(0, idx), ht.index_select(0, idx)
        lab = lab.index_select(0, idx) if lab is not None else None
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    chunk = chunk_size or auto_chunk_size(student_weight.shape[0])
    n_tok = hs.shape[0]
    if n_tok == 0:
        return _no_tokens(hs, student_weight)
    loss, kl_sum, ce_sum = _ChunkedKD.apply(
        hs, ht, student_weight, teacher_weight.detach(), lab, float(temperature), float(kl_weight),
        float(ce_weight), int(chunk))
    return _reduce(loss, kl_sum, ce_sum, n_tok, lab, reduction, num_sequences, num_tokens)


def naive_kd_loss(student_hidden, teacher_hidden, student_weight, teacher_weight, mask=None, labels=None,
                  temperature=1.0, kl_weight=1.0, ce_weight=0.0, reduction="sequence", num_sequences=None):
    """The same loss through full logits (reference for tests and the benchmark)."""
    if student_hidden.dim() == 3 and num_sequences is None:
        num_sequences = student_hidden.shape[0]
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    lab = labels.reshape(-1) if labels is not None else None
    if mask is not None:
        keep = mask.reshape(-1).bool()
        hs, ht = hs[keep], ht[keep]
        lab = lab[keep] if lab is not None else None
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    zs = (hs @ student_weight.t()).to(acc)
    zt = (ht @ teacher_weight.t()).to(acc).detach()
    kl = F.kl_div(torch.log_softmax(zs / temperature, -1), torch.log_softmax(zt / temperature, -1),
                  reduction="sum", log_target=True)
    loss = kl_weight * temperature ** 2 * kl
    if ce_weight and lab is not None:
        loss = loss + ce_weight * F.cross_entropy(zs, lab, ignore_index=-100, reduction="sum")
    denom = {"sequence": float(num_sequences or 1), "token": float(hs.shape[0]), "sum": 1.0}[reduction]
    return loss / denom


# ------------------------------------------------------------------------------------- KD from a teacher cache

class _ChunkedSparseKD(torch.autograd.Function):
    """Sum over tokens of kl_weight * T^2 * KL over the teacher's top-k ids plus one tail bucket, + the optional CE.

    The teacher's distribution (at temperature T) is known on its top-k ids (`logp_t`) and as the log of the mass
    left outside them (`tail_t`); the student's is coarsened the same way: its own probabilities on those ids and
    the sum of the rest. The KL of the two coarsened distributions is exact where the tail is empty (k = vocab).
    Its gradient w.r.t. the student's tempered logits is q - target, where the target is p_t on the top-k ids
    and spreads the teacher's tail mass over the other ids in proportion to the student's own tail.

    With tail samples (`sample_ids` [N, s]: ids drawn from the teacher's distribution outside its top-k, and
    `sample_logp`: the teacher's log-probs at them) the samples replace the bucket. The target puts p_tail / s on
    each drawn id (an id drawn twice gets it twice), so it sums to 1 and the gradient q - target also trains the
    shape of the student's tail; the KL is the unbiased estimate
    sum_top p_t (log p_t - log q) + p_tail * mean_i (log p_t(x_i) - log q(x_i)).
    """

    @staticmethod
    def forward(ctx, hs, ws, ids, logp_t, tail_t, sample_ids, sample_logp, labels, temperature, kl_weight,
                ce_weight, chunk_size):
        st = _ChunkState(ctx, hs, ws, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        acc, n = st.acc, hs.shape[0]
        inv_t = 1.0 / temperature
        use_ce = ce_weight != 0.0 and labels is not None
        sampled = sample_ids is not None
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            hs_c, ids_c = hs[start:end], ids[start:end]
            zs = (hs_c @ st.ws_mm.t()).to(acc)
            logq = torch.log_softmax(zs * inv_t if inv_t != 1.0 else zs, dim=-1)
            lp_t = logp_t[start:end].to(acc)
            p_t = lp_t.exp()
            lq_top = logq.gather(-1, ids_c)
            lp_tail = tail_t[start:end].to(acc)
            p_tail = lp_tail.exp()
            has_tail = p_tail > 0
            if sampled:
                sid_c = sample_ids[start:end]
                tail_kl = p_tail * (sample_logp[start:end].to(acc) - logq.gather(-1, sid_c)).mean(-1)
            else:
                # log of the student's mass outside the teacher's top-k (-inf where they cover the vocabulary)
                lq_tail = logq.scatter(-1, ids_c, float("-inf")).logsumexp(-1)
                tail_kl = p_tail * (lp_tail - lq_tail)
            tail_kl = torch.where(has_tail, tail_kl, torch.zeros_like(p_tail))
            st.kl += (p_t * (lp_t - lq_top)).sum() + tail_kl.sum()
            del lp_t
            if use_ce:
                logp1 = logq if inv_t == 1.0 else torch.log_softmax(zs, dim=-1)
                safe, valid = st.add_ce(logp1, labels[start:end])
            if st.needs_grad:
                q = logq.exp()
                if sampled:
                    # target: p_t on the top-k ids, p_tail / s per draw on the drawn ids, 0 elsewhere
                    g = q
                    g.scatter_(-1, ids_c, lq_top.exp() - p_t)
                    share = torch.where(has_tail, p_tail, torch.zeros_like(p_tail)) / -sid_c.shape[-1]
                    g.scatter_add_(-1, sid_c, share[:, None].expand(sid_c.shape))
                else:
                    # target: p_t on the top-k ids, p_tail * q / q_tail elsewhere
                    scale = torch.where(has_tail, (lp_tail - lq_tail).exp(), torch.zeros_like(p_tail))
                    g = q * (1.0 - scale[:, None])
                    g.scatter_(-1, ids_c, lq_top.exp() - p_t)
                g.mul_(kl_weight * temperature)
                del q, p_t, logq, zs
                if use_ce:
                    _add_ce_grad(g, logp1, safe, valid, ce_weight)
                g_lp = g.to(st.mm_dtype)
                del g
                st.push(g_lp, hs_c, start, end)
                del g_lp
        return st.finish(ctx, temperature, kl_weight, ce_weight, use_ce)

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        gh, gw = _head_grads(ctx, grad_loss)
        return gh, gw, None, None, None, None, None, None, None, None, None, None


def sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_weight: float = 1.0,
    ce_weight: float = 0.0,
    reduction: str = "sequence",
    num_sequences: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    tail_ids: torch.Tensor | None = None,
    tail_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward KL from stored teacher top-k log-probs to the student, in token chunks (chunked_kd_loss's contract).

    student_hidden [N, H] or [B, T, H], student_weight [V, H]; topk_ids [..., k] (int), topk_logprobs [..., k]
    (the teacher's log-probs at temperature T on those ids, any float dtype) and tail_logprob [...] (log of the
    teacher's mass outside them; -inf when k = V), with the student's leading shape. The KL is over the k ids and
    one bucket for the rest of the vocabulary, or, given tail_ids [..., s] (ids drawn from the teacher's
    distribution outside its top-k) and tail_logprobs [..., s] (the teacher's log-probs at them), over the k ids and
    those draws (see _ChunkedSparseKD); mask, labels, the weights and the reductions are chunked_kd_loss's.
    Returns (loss, {"kl", "ce", "tokens"}) as chunked_kd_loss does.
    """
    if student_hidden.dim() == 3 and num_sequences is None:
        num_sequences = student_hidden.shape[0]
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    k = topk_ids.shape[-1]
    ids = topk_ids.reshape(-1, k).long()
    lp = topk_logprobs.reshape(-1, k).detach()
    tail = tail_logprob.reshape(-1).detach()
    if not (ids.shape[0] == lp.shape[0] == tail.shape[0] == hs.shape[0]) or lp.shape[-1] != k:
        raise ValueError(f"the student has {hs.shape[0]} tokens but the teacher's top-k ids / log-probs / tail hold "
                         f"{ids.shape[0]} / {lp.shape[0]} x {lp.shape[-1]} / {tail.shape[0]} (k = {k})")
    if (tail_ids is None) != (tail_logprobs is None):
        raise ValueError("tail_ids and tail_logprobs go together: give both or neither")
    sid = slp = None
    if tail_ids is not None:
        s = tail_ids.shape[-1]
        sid, slp = tail_ids.reshape(-1, s).long(), tail_logprobs.reshape(-1, s).detach()
        if s < 1 or sid.shape[0] != hs.shape[0] or slp.shape != sid.shape:
            raise ValueError(f"the student has {hs.shape[0]} tokens but the teacher's tail ids / log-probs hold "
                             f"{sid.shape[0]} x {s} / {slp.shape[0]} x {slp.shape[-1]} (need s >= 1 per token)")
    if k > student_weight.shape[0]:
        raise ValueError(f"top-k of {k} ids exceeds the student's vocabulary of {student_weight.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    lab = labels.reshape(-1) if labels is not None else None
    if mask is not None:
        idx = mask.reshape(-1).nonzero().squeeze(-1)
        hs, ids, lp, tail = (x.index_select(0, idx) for x in (hs, ids, lp, tail))
        lab = lab.index_select(0, idx) if lab is not None else None
        if sid is not None:
            sid, slp = sid.index_select(0, idx), slp.index_select(0, idx)
    chunk = chunk_size or auto_chunk_size(student_weight.shape[0])
    n_tok = hs.shape[0]
    if n_tok == 0:
        return _no_tokens(hs, student_weight)
    loss, kl_sum, ce_sum = _ChunkedSparseKD.apply(hs, student_weight, ids, lp, tail, sid, slp, lab,
                                                  float(temperature), float(kl_weight), float(ce_weight), int(chunk))
    return _reduce(loss, kl_sum, ce_sum, n_tok, lab, reduction, num_sequences, num_tokens)


# ----------------------------------------------------------------------------------------------- DPO

def sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, input_ids: torch.Tensor,
                   loss_mask: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Sum of log p(input_ids[t+1] | <= t) over positions t with loss_mask[t + 1] (response tokens).

    hidden [B, T, H] (after the final norm), weight [V, H]; returns [B] fp32. Logits are built per chunk of
    rows under activation checkpointing, so full [B, T, V] logits are never stored for backward.
    """
    b, t, h = hidden.shape
    tgt = input_ids[:, 1:]
    m = loss_mask[:, 1:].bool()
    hid = hidden[:, :-1]
    chunk = chunk_size or max(1, auto_chunk_size(weight.shape[0]) // max(1, t - 1))

    def rows_logp(hc, tc):
        logits = (hc @ weight.t()).to(torch.float64 if hc.dtype == torch.float64 else torch.float32)
        return torch.log_softmax(logits, -1).gather(-1, tc[..., None]).squeeze(-1)

    out = []
    for s in range(0, b, chunk):
        hc, tc = hid[s:s + chunk], tgt[s:s + chunk]
        if torch.is_grad_enabled() and (hc.requires_grad or weight.requires_grad):
            lp = torch.utils.checkpoint.checkpoint(rows_logp, hc, tc, use_reentrant=False)
        else:
            lp = rows_logp(hc, tc)
        out.append(lp)
    logp = torch.cat(out, 0)
    return (logp * m).sum(-1)


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float = 0.01, label_smoothing: float = 0.0):
    """Sigmoid DPO (METHOD §7): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over pairs.

    `label_smoothing` > 0 gives the conservative variant (cDPO). Returns (loss, chosen_rewards,
    rejected_rewards) with rewards = beta * (pi - ref), detached.
    """
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    logits = beta * margin
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    chosen_rewards = (beta * (policy_chosen - ref_chosen)).detach()
    rejected_rewards = (beta * (policy_rejected - ref_rejected)).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


__all__ = ["chunked_kd_loss", "naive_kd_loss", "sparse_kd_loss", "auto_chunk_size", "sequence_logps",
           "dpo_sigmoid_loss"]
