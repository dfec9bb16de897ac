"""The sparse KD loss over a teacher's stored top-k (zebra.stages.losses.sparse_kd_loss) against float64 references
written from the definitions: the dense KL when k = vocab, the KL of the coarsened distributions (k ids + one tail
bucket) otherwise, gradients included; and the cache's top-k extraction (zebra.stages.teacher_cache.teacher_topk)."""

from __future__ import annotations

import pytest
import torch

from zebra.stages.losses import chunked_kd_loss, sparse_kd_loss
from zebra.stages.teacher_cache import teacher_topk

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
    ids, logp, tail = teacher_topk(ht.reshape(-1, HT), wt, V, temperature)
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
    ids, logp, tail = teacher_topk(ht.reshape(-1, HT), wt, k, temperature)
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
    ids, logp, tail = teacher_topk(ht.reshape(-1, HT), wt, 10, 1.0)
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
    ids, logp, tail = teacher_topk(ht.reshape(-1, HT), wt, 4, 2.0, chunk_size=3)
    full = torch.log_softmax((ht.reshape(-1, HT) @ wt.t()) / 2.0, -1)
    ref_lp, ref_ids = full.topk(4, -1)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(logp.double(), ref_lp, rtol=1e-6, atol=1e-6)
    rest = torch.log1p(-ref_lp.exp().sum(-1))
    torch.testing.assert_close(tail.double(), rest, rtol=1e-5, atol=1e-6)


def test_sparse_loss_rejects_mismatched_shapes():
    hs, ht, ws, wt, mask, _ = tensors()
    ids, logp, tail = teacher_topk(ht.reshape(-1, HT), wt, 5, 1.0)
    with pytest.raises(ValueError, match="tokens"):
        sparse_kd_loss(hs, ws, ids[:-1], logp[:-1], tail[:-1])
    with pytest.raises(ValueError, match="temperature"):
        sparse_kd_loss(hs.reshape(-1, HS), ws, ids, logp, tail, temperature=0.0)
