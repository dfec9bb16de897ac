"""Per-token means under data parallelism: each rank divides its summed loss by its share of the GLOBAL batch's
real tokens (all-reduced count / world size), so that the mean over ranks (what DDP / ZeRO average) is the global
batch's per-token mean even when padding leaves the ranks with different numbers of real tokens."""

from __future__ import annotations

import types

import torch

from zebra.stages.ilkd import masked_l2
from zebra.stages.kd import KDModule
from zebra.stages.losses import chunked_kd_loss


def fake_two_rank_trainer(counts: list[float]):
    """A trainer whose strategy's sum-reduce returns the sum of both ranks' counts."""
    strategy = types.SimpleNamespace(reduce=lambda t, reduce_op="mean": torch.tensor(sum(counts)))
    return types.SimpleNamespace(world_size=2, strategy=strategy)


def test_rank_losses_average_to_the_global_token_mean():
    torch.manual_seed(0)
    a, b = torch.randn(4, 10, 8, dtype=torch.float64), torch.randn(4, 10, 8, dtype=torch.float64)
    w = torch.ones(4, 10, dtype=torch.float64)
    w[3, 2:] = 0  # rank 1's second row is mostly padding: the ranks hold 20 and 12 real tokens
    whole = masked_l2(a, b, w)
    share = w.sum() / 2
    ranks = [masked_l2(a[:2], b[:2], w[:2], share), masked_l2(a[2:], b[2:], w[2:], share)]
    assert torch.allclose((ranks[0] + ranks[1]) / 2, whole, rtol=1e-12)
    naive = [masked_l2(a[:2], b[:2], w[:2]), masked_l2(a[2:], b[2:], w[2:])]  # each rank's own mean: biased
    assert not torch.allclose((naive[0] + naive[1]) / 2, whole, rtol=1e-6)

    # the KD loss's token reduction takes the same denominator
    V, H = 50, 8
    hs, ht = torch.randn(4, 10, H, dtype=torch.float64), torch.randn(4, 10, H, dtype=torch.float64)
    ws, wt = torch.randn(V, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    mask = w.bool()
    full, _ = chunked_kd_loss(hs, ht, ws, wt, mask=mask, reduction="token")
    parts = [chunked_kd_loss(hs[s], ht[s], ws, wt, mask=mask[s], reduction="token", num_tokens=share)[0]
             for s in (slice(0, 2), slice(2, 4))]
    assert torch.allclose((parts[0] + parts[1]) / 2, full, rtol=1e-10)


def test_token_denominator_is_the_share_of_the_global_count():
    module = KDModule(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    module.train()
    assert float(module.token_denominator(torch.tensor(20.0))) == 20.0  # no trainer: one process
    module._trainer = fake_two_rank_trainer([20.0, 12.0])
    assert float(module.token_denominator(torch.tensor(20.0))) == 16.0
    module.eval()  # evaluation (held-out KL) stays per batch
    assert float(module.token_denominator(torch.tensor(20.0))) == 20.0
