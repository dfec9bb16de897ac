"""The sparse KD loss over a teacher's stored top-k (zebra.stages.losses.sparse_kd_loss) against float64 references
written from the definitions: the dense KL when k = vocab, the KL of the coarsened distributions (k ids + one tail
bucket) otherwise, the unbiased estimate over tail draws (the dense KL itself where the draws hit each tail id as
often as the teacher does), gradients included; and the cache's top-k extraction and tail draws
(zebra.stages.teacher_cache.teacher_topk)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zebra.stages.losses import chunked_kd_loss, naive_kd_loss, sparse_kd_loss
from zebra.stages.teacher_cache import tail_generator, teacher_topk

V, HS, HT = 97, 12, 16


def tensors(n=2, t=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, t, HS, generator=g, dtype=dtype)
    ht = torch.randn(n, t, HT, generator=g, dtype=dtype)
    ws = torch.randn(V, HS, generator=g, dtype=dtype) * 0.7
    wt = torch.randn(V, HT, generator=g, dtype=dtype) * 0.9
    mask = torch.rand(n, t, generator=g) > 0.25
    labels = torch.randint(0, V, (n, t), generator=g).masked_fill(torch.rand(n, t, generator=g) > 0.7, -100)
    return hs, ht, ws, wt, mask, labels


def coarse_kl_reference(hs, ws, zt, k, mask, temperature):
    """sum over counted tokens of KL(P || Q), P and Q the teacher's / student's probabilities on the teacher's top-k
    ids plus one bucket holding the rest of the vocabulary, at temperature T, times T^2 (float64, plain sums)."""
    p = torch.softmax(zt.double() / temperature, -1)
    q = torch.softmax((hs @ ws.t()).double() / temperature, -1)
    top = p.topk(k, -1).indices
    pk, qk = p.gather(-1, top), q.gather(-1, top)
    p_rest, q_rest = 1 - pk.sum(-1), 1 - qk.sum(-1)
    kl = (pk * (pk.log() - qk.log())).sum(-1)
    if k < V:
        kl = kl + p_rest * (p_rest.log() - q_rest.log())
    return temperature ** 2 * (kl * mask).sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_with_k_equal_vocab_is_the_dense_kl(temperature):
    hs, ht, ws, wt, mask, _ = tensors(dtype=torch.float32)
    ids, logp, tail, _, _ = teacher_topk(ht.reshape(-1, HT), wt, V, temperature)
    assert torch.isinf(tail).all() and (tail < 0).all()  # nothing is left outside k = vocab ids
    shape = ht.shape[:2]
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    sparse, stats = sparse_kd_loss(hs1, ws1, ids.reshape(*shape, V), logp.reshape(*shape, V), tail.reshape(shape),
                                   mask=mask, temperature=temperature, chunk_size=5)
    sparse.backward()
    hs2, ws2 = hs.double().requires_grad_(), ws.double().requires_grad_()
    p = torch.log_softmax((ht.double() @ wt.double().t()) / temperature, -1)
    q = torch.log_softmax((hs2 @ ws2.t()) / temperature, -1)
    dense = temperature ** 2 * ((p.exp() * (p - q)).sum(-1) * mask).sum() / shape[0]
    dense.backward()
    assert float(sparse.detach()) == pytest.approx(float(dense), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(hs1.grad.double(), hs2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ws1.grad.double(), ws2.grad, rtol=1e-5, atol=1e-6)
    # and the same value as the online chunked loss from the teacher's hidden states
    online, ostats = chunked_kd_loss(hs, ht, ws, wt, mask=mask, temperature=temperature)
    assert float(sparse) == pytest.approx(float(online), rel=1e-5)
    assert float(stats["kl"]) == pytest.approx(float(ostats["kl"]), rel=1e-5)


@pytest.mark.parametrize("k,temperature,reduction", [(1, 1.0, "sequence"), (7, 1.0, "token"), (30, 1.5, "sum")])
def test_sparse_kl_matches_the_coarsened_reference(k, temperature, reduction):
    hs, ht, ws, wt, mask, _ = tensors(seed=k)
    zt = ht @ wt.t()
    ids, logp, tail, _, _ = teacher_topk(ht.reshape(-1, HT), wt, k, temperature)
    shape = ht.shape[:2]
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, stats = sparse_kd_loss(hs1, ws1, ids.reshape(*shape, k), logp.reshape(*shape, k), tail.reshape(shape),
                                 mask=mask, temperature=temperature, reduction=reduction, chunk_size=4)
    loss.backward()
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = coarse_kl_reference(hs2, ws2, zt, k, mask, temperature)
    denom = {"sequence": shape[0], "token": int(mask.sum()), "sum": 1}[reduction]
    (ref / denom).backward()
    assert float(loss) == pytest.approx(float(ref / denom), rel=1e-10)
    assert float(stats["kl"]) == pytest.approx(float(ref) / temperature ** 2 / int(mask.sum()), rel=1e-10)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=1e-9, atol=1e-12)


def test_sparse_loss_ce_term_and_weights():
    hs, ht, ws, wt, mask, labels = tensors(seed=3)
    ids, logp, tail, _, _ = teacher_topk(ht.reshape(-1, HT), wt, 10, 1.0)
    shape = ht.shape[:2]
    hs1 = hs.clone().requires_grad_()
    loss, stats = sparse_kd_loss(hs1, ws, ids.reshape(*shape, 10), logp.reshape(*shape, 10), tail.reshape(shape),
                                 mask=mask, labels=labels, kl_weight=0.5, ce_weight=0.3, chunk_size=3)
    loss.backward()
    hs2 = hs.clone().requires_grad_()
    zs = hs2 @ ws.t()
    keep = mask.reshape(-1)
    ce = torch.nn.functional.cross_entropy(zs.reshape(-1, V)[keep], labels.reshape(-1)[keep], ignore_index=-100,
                                           reduction="sum")
    ref = (0.5 * coarse_kl_reference(hs2, ws, ht @ wt.t(), 10, mask, 1.0) + 0.3 * ce) / shape[0]
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-10)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-9, atol=1e-12)
    n_lab = int((labels.reshape(-1)[keep] != -100).sum())
    assert float(stats["ce"]) == pytest.approx(float(ce) / n_lab, rel=1e-10)


def test_teacher_topk_values():
    _, ht, _, wt, _, _ = tensors(seed=5)
    ids, logp, tail, tail_ids, tail_logp = teacher_topk(ht.reshape(-1, HT), wt, 4, 2.0, chunk_size=3)
    assert tail_ids.shape == tail_logp.shape == (ht.shape[0] * ht.shape[1], 0)  # no uniforms, no draws
    full = torch.log_softmax((ht.reshape(-1, HT) @ wt.t()) / 2.0, -1)
    ref_lp, ref_ids = full.topk(4, -1)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(logp.double(), ref_lp, rtol=1e-6, atol=1e-6)
    rest = torch.log1p(-ref_lp.exp().sum(-1))
    torch.testing.assert_close(tail.double(), rest, rtol=1e-5, atol=1e-6)


def test_sparse_loss_rejects_mismatched_shapes():
    hs, ht, ws, wt, mask, _ = tensors()
    ids, logp, tail, _, _ = teacher_topk(ht.reshape(-1, HT), wt, 5, 1.0)
    with pytest.raises(ValueError, match="tokens"):
        sparse_kd_loss(hs, ws, ids[:-1], logp[:-1], tail[:-1])
    with pytest.raises(ValueError, match="temperature"):
        sparse_kd_loss(hs.reshape(-1, HS), ws, ids, logp, tail, temperature=0.0)


# ------------------------------------------------------------------------------------------------ tail draws
S = 8  # draws per token in the exactness tests
# a tail's conditional probabilities (6 ids outside a top-2 of 8) in units of 1/S, i.e. the draws [a,a,b,b,c,d,e,f]
# and [a,a,a,b,c,d,e,f]: the draws' empirical distribution is the teacher's own
TAIL_COUNTS = ((2, 2, 1, 1, 1, 1), (3, 1, 1, 1, 1, 1))


def exact_draws(n: int, t: int, v: int = 8, k: int = 2, seed: int = 0):
    """A teacher (log-probs at temperature T, float64 [n, t, v]) whose tail has conditional probabilities in
    multiples of 1/S, its top-k ids and log-probs, the log of its tail mass, and S draws per token (shuffled) that
    hit each tail id exactly as often as its conditional probability says, with the teacher's log-probs at them."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.empty(n, t, v, dtype=torch.float64)
    top = torch.empty(n, t, k, dtype=torch.long)
    draws = torch.empty(n, t, S, dtype=torch.long)
    for i in range(n):
        for j in range(t):
            ids = torch.randperm(v, generator=g)
            counts = torch.tensor(TAIL_COUNTS[(i * t + j) % len(TAIL_COUNTS)])
            mass = 0.1 + 0.5 * torch.rand((), generator=g, dtype=torch.float64)
            head = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
            p = torch.empty(v, dtype=torch.float64)
            p[ids[:k]] = head / head.sum() * (1 - mass)
            p[ids[k:]] = mass * counts / S
            logp[i, j], top[i, j] = p.log(), ids[:k]
            draws[i, j] = ids[k:].repeat_interleave(counts)[torch.randperm(S, generator=g)]
    tail = torch.log1p(-logp.gather(-1, top).exp().sum(-1))
    return logp, top, logp.gather(-1, top), tail, draws, logp.gather(-1, draws)


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("temperature,kl_weight,ce_weight,reduction", [
    (1.0, 1.0, 0.0, "sequence"), (2.5, 0.7, 0.3, "token"), (0.6, 1.0, 0.0, "sum")])
def test_tail_draws_equal_to_the_teacher_give_the_dense_kl(chunk, temperature, kl_weight, ce_weight, reduction):
    n, t, h, v = 3, 7, 5, 8
    logp, top, top_lp, tail, draws, draw_lp = exact_draws(n, t)
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(n, t, h, generator=g, dtype=torch.float64)
    ws = torch.randn(v, h, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) > 0.3
    labels = torch.randint(0, v, (n, t), generator=g).masked_fill(torch.rand(n, t, generator=g) > 0.7, -100)
    kw = dict(mask=mask, labels=labels, temperature=temperature, kl_weight=kl_weight, ce_weight=ce_weight,
              reduction=reduction, chunk_size=chunk)
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, stats = sparse_kd_loss(hs1, ws1, top, top_lp, tail, tail_ids=draws, tail_logprobs=draw_lp, **kw)
    loss.backward()
    # float64 from the definition: kl_weight T^2 KL(p || softmax(z / T)) + ce_weight CE(z), over the counted tokens
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    z = hs2 @ ws2.t()
    kl = (logp.exp() * (logp - torch.log_softmax(z / temperature, -1))).sum(-1)[mask]
    ce = F.cross_entropy(z[mask], labels[mask], ignore_index=-100, reduction="sum")
    denom = {"sequence": n, "token": int(mask.sum()), "sum": 1}[reduction]
    ref = (kl_weight * temperature ** 2 * kl.sum() + ce_weight * ce) / denom
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-10, abs=1e-10)
    assert float(stats["kl"]) == pytest.approx(float(kl.mean()), rel=1e-10, abs=1e-10)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=1e-10, atol=1e-12)
    # and online dense KD (chunked_kd_loss) from a teacher whose tempered logits are log p: an identity head
    hs3, ws3 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    online, ostats = chunked_kd_loss(hs3, temperature * logp, ws3, torch.eye(v, dtype=torch.float64), **kw)
    online.backward()
    assert float(loss) == pytest.approx(float(online), rel=1e-10, abs=1e-10)
    assert float(stats["kl"]) == pytest.approx(float(ostats["kl"]), rel=1e-10, abs=1e-10)
    torch.testing.assert_close(hs1.grad, hs3.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ws1.grad, ws3.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k,s,temperature", [(1, 1, 1.0), (7, 5, 2.0), (30, 40, 0.8)])
def test_tail_draws_loss_and_gradient_follow_the_definition(k, s, temperature):
    """Any draws (repeats included): the KL estimate sum_top p (log p - log q) + p_tail mean_i (log p(x_i) - log q(x_i))
    and the gradient T (q - target) w.r.t. the student's logits, target = p on the top-k + p_tail / s per draw."""
    hs, ht, ws, wt, mask, _ = tensors(seed=20 + k)
    n, t = ht.shape[:2]
    g = torch.Generator().manual_seed(k)
    ids, lp, tail, draws, draw_lp = teacher_topk(ht.reshape(-1, HT), wt, k, temperature,
                                                 tail_uniforms=torch.rand(n * t, s, generator=g, dtype=torch.float64))
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, stats = sparse_kd_loss(hs1, ws1, ids.reshape(n, t, k), lp.reshape(n, t, k), tail.reshape(n, t),
                                 mask=mask, temperature=temperature, reduction="token", chunk_size=4,
                                 tail_ids=draws.reshape(n, t, s), tail_logprobs=draw_lp.reshape(n, t, s))
    loss.backward()
    keep = mask.reshape(-1)
    count = int(keep.sum())
    hsf = hs.reshape(-1, HS)
    logq = torch.log_softmax((hsf @ ws.t()) / temperature, -1)
    ids, draws = ids.long(), draws.long()
    est = (lp.exp() * (lp - logq.gather(-1, ids))).sum(-1) + tail.exp() * (draw_lp - logq.gather(-1, draws)).mean(-1)
    assert float(loss) == pytest.approx(temperature ** 2 * float(est[keep].sum()) / count, rel=1e-10)
    assert float(stats["kl"]) == pytest.approx(float(est[keep].mean()), rel=1e-10)
    target = torch.zeros_like(logq)
    for r in range(n * t):
        for j in range(k):
            target[r, ids[r, j]] += lp[r, j].exp()
        for x in draws[r]:
            target[r, x] += tail[r].exp() / s
    torch.testing.assert_close(target.sum(-1), torch.ones(n * t, dtype=torch.float64), rtol=0, atol=1e-12)
    grad_z = temperature * (logq.exp() - target) * keep[:, None] / count
    torch.testing.assert_close(hs1.grad.reshape(-1, HS), grad_z @ ws, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ws1.grad, grad_z.t() @ hsf, rtol=1e-9, atol=1e-12)


def test_many_tail_draws_approach_the_dense_kl():
    """Unbiased: with many draws per token the estimate and its gradient approach the dense KL's (fixed seed)."""
    hs, ht, ws, wt, mask, _ = tensors(seed=11)
    n, t = ht.shape[:2]
    k, s, temperature = 5, 20000, 1.5
    u = torch.rand(n * t, s, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids, lp, tail, draws, draw_lp = teacher_topk(ht.reshape(-1, HT), wt, k, temperature, tail_uniforms=u)
    assert float(tail.exp().mean()) > 0.3  # the tail carries a good share of the KL here
    hs1, ws1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, _ = sparse_kd_loss(hs1, ws1, ids.reshape(n, t, k), lp.reshape(n, t, k), tail.reshape(n, t), mask=mask,
                             temperature=temperature, tail_ids=draws.reshape(n, t, s),
                             tail_logprobs=draw_lp.reshape(n, t, s))
    loss.backward()
    hs2, ws2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    dense = naive_kd_loss(hs2, ht, ws2, wt, mask=mask, temperature=temperature)
    dense.backward()
    assert float(loss) == pytest.approx(float(dense), rel=1e-2)
    torch.testing.assert_close(hs1.grad, hs2.grad, rtol=0, atol=2e-2 * float(hs2.grad.abs().max()))
    torch.testing.assert_close(ws1.grad, ws2.grad, rtol=0, atol=2e-2 * float(ws2.grad.abs().max()))
    # where the one tail bucket is far off (a bound the draws' estimate would not meet by chance)
    bucket, _ = sparse_kd_loss(hs, ws, ids.reshape(n, t, k), lp.reshape(n, t, k), tail.reshape(n, t), mask=mask,
                               temperature=temperature)
    assert abs(float(bucket) / float(dense) - 1) > 0.1


def test_tail_draws_follow_the_renormalised_tail():
    """The build's draws (fp32, as the stage runs, uniforms from a shard's generator): never a top-k id, with the
    teacher's log-probs at them, their frequencies the teacher's tail renormalised, whatever the chunk size."""
    _, ht, _, wt, _, _ = tensors(seed=7, dtype=torch.float32)
    hidden = ht.reshape(-1, HT)[:4]
    k, s, temperature = 5, 50000, 2.0
    u = torch.rand(4, s, generator=tail_generator(0, 0, "cpu"))
    ids, _, tail, draws, draw_lp = teacher_topk(hidden, wt, k, temperature, tail_uniforms=u)
    assert draws.dtype == torch.int32 and draws.shape == (4, s) and draw_lp.dtype == torch.float32
    full = torch.log_softmax((hidden @ wt.t()) / temperature, -1)
    torch.testing.assert_close(draw_lp, full.gather(-1, draws.long()), rtol=0, atol=0)
    for r in range(4):
        assert not torch.isin(draws[r], ids[r]).any()
        p = full[r].double().exp()
        p[ids[r].long()] = 0.0
        freq = torch.bincount(draws[r].long(), minlength=V).double() / s
        # binomial standard deviation at most 0.5 / sqrt(s) = 0.0022
        assert float((freq - p / p.sum()).abs().max()) < 0.01, r
        assert float(p.sum()) == pytest.approx(float(tail[r].exp()), rel=1e-5)
    again = teacher_topk(hidden, wt, k, temperature, chunk_size=3, tail_uniforms=u)
    assert torch.equal(again[3], draws)  # the same ids; the log-probs up to the matmul's rounding per chunk shape
    torch.testing.assert_close(again[4], draw_lp, rtol=1e-6, atol=1e-6)


def test_tail_draws_must_come_in_pairs_and_shapes():
    hs, ht, ws, wt, _, _ = tensors()
    n = ht.shape[0] * ht.shape[1]
    u = torch.rand(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ids, logp, tail, draws, draw_lp = teacher_topk(ht.reshape(-1, HT), wt, 5, 1.0, tail_uniforms=u)
    flat = hs.reshape(-1, HS)
    with pytest.raises(ValueError, match="give both or neither"):
        sparse_kd_loss(flat, ws, ids, logp, tail, tail_ids=draws)
    with pytest.raises(ValueError, match="tail ids"):
        sparse_kd_loss(flat, ws, ids, logp, tail, tail_ids=draws[:-1], tail_logprobs=draw_lp[:-1])
    with pytest.raises(ValueError, match="tail_uniforms"):
        teacher_topk(ht.reshape(-1, HT), wt, 5, 1.0, tail_uniforms=u[:-1])
