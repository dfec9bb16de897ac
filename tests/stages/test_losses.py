"""The chunked KD loss equals the naive full-logits loss (value and gradients); the DPO loss behaves."""

import pytest
import torch
import torch.nn.functional as F

from zebra.stages.losses import chunked_kd_loss, dpo_sigmoid_loss, naive_kd_loss, sequence_logps

V = 4096


def _inputs(dtype, b=2, t=37, hs=48, ht=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(b, t, hs, generator=g, dtype=dtype)
    h_t = torch.randn(b, t, ht, generator=g, dtype=dtype)
    w_s = torch.randn(V, hs, generator=g, dtype=dtype) * 0.3
    w_t = torch.randn(V, ht, generator=g, dtype=dtype) * 0.3
    mask = torch.rand(b, t, generator=g) > 0.2
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[0, :5] = -100
    return h_s, h_t, w_s, w_t, mask, labels


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("temperature,ce_weight,reduction", [(1.0, 0.0, "sequence"), (2.0, 0.5, "token"),
                                                             (1.0, 0.3, "sum")])
def test_chunked_kd_matches_naive(dtype, rtol, temperature, ce_weight, reduction):
    h_s, h_t, w_s, w_t, mask, labels = _inputs(dtype)
    kw = dict(mask=mask, labels=labels, temperature=temperature, ce_weight=ce_weight, reduction=reduction)
    a_h, a_w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    b_h, b_w = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss, stats = chunked_kd_loss(a_h, h_t, a_w, w_t, chunk_size=16, **kw)
    ref = naive_kd_loss(b_h, h_t, b_w, w_t, **kw)
    (loss * 1.7).backward()
    (ref * 1.7).backward()
    torch.testing.assert_close(loss, ref, rtol=rtol, atol=0)
    torch.testing.assert_close(a_h.grad, b_h.grad, rtol=rtol, atol=rtol * b_h.grad.abs().max().item())
    torch.testing.assert_close(a_w.grad, b_w.grad, rtol=rtol, atol=rtol * b_w.grad.abs().max().item())
    assert stats["tokens"].item() == int(mask.sum())


def test_chunked_kd_plain_kl_div_reference():
    """Against F.kl_div 'batchmean' on full fp32 logits, written out independently (no mask, T=1)."""
    h_s, h_t, w_s, w_t, _, _ = _inputs(torch.float32, b=3, t=20)
    a = h_s.clone().requires_grad_()
    b = h_s.clone().requires_grad_()
    loss, stats = chunked_kd_loss(a, h_t, w_s, w_t, reduction="token")
    ref = F.kl_div(torch.log_softmax((b @ w_s.t()).reshape(-1, V), -1),
                   torch.softmax((h_t @ w_t.t()).reshape(-1, V), -1), reduction="batchmean")
    loss.backward(), ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * b.grad.abs().max().item())
    torch.testing.assert_close(stats["kl"], ref.detach(), rtol=1e-4, atol=0)


def test_chunked_kd_zero_when_equal_and_no_teacher_grad():
    h_s, _, w_s, _, _, _ = _inputs(torch.float64)
    wt = w_s.clone().requires_grad_()
    loss, _ = chunked_kd_loss(h_s, h_s, w_s, wt)
    assert abs(loss.item()) < 1e-10
    assert not loss.requires_grad  # nothing of the student requires grad; the teacher never gets one


def test_chunked_kd_rejects_vocab_mismatch():
    h_s, h_t, w_s, w_t, _, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="same tokenizer"):
        chunked_kd_loss(h_s, h_t, w_s, w_t[:-1])


def test_dpo_sigmoid_loss_and_sequence_logps():
    pc, pr = torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    loss, cr, rj = dpo_sigmoid_loss(pc, pr, rc, rr, beta=0.1)
    margin = torch.tensor([(1.0 + 1.0), (0.0 - 1.0)])
    torch.testing.assert_close(loss, -F.logsigmoid(0.1 * margin).mean())
    torch.testing.assert_close(cr, 0.1 * (pc - rc))
    # identical policy and reference: loss log 2
    loss0, _, _ = dpo_sigmoid_loss(pc, pr, pc, pr)
    assert abs(loss0.item() - torch.log(torch.tensor(2.0)).item()) < 1e-6

    g = torch.Generator().manual_seed(0)
    hid = torch.randn(2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 50, (2, 9), generator=g)
    m = torch.zeros(2, 9, dtype=torch.bool)
    m[:, 4:] = True
    got = sequence_logps(hid, w, ids, m, chunk_size=1)
    logp = torch.log_softmax(hid @ w.t(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, (logp * m[:, 1:]).sum(-1))
    got.sum().backward()
    assert hid.grad is not None and hid.grad[:, :3].abs().sum() == 0


def test_kd_loss_benchmark_smoke_on_cpu():
    from benchmarks.kd_loss import main

    report = main(["--device", "cpu", "--smoke"])
    assert report["pass"]["loss<=1e-4"] and report["pass"]["grad<=1e-3"]
    assert report["chunk_size"] < report["seq"] * report["batch"]  # several chunks


@pytest.mark.gpu
def test_kd_loss_benchmark_on_gpu(tmp_path):
    """Memory and agreement at the acceptance size (vocab 128256, seq 2048, batch 4, 512-token chunks; the
    naive loss peaks near 30 GB). At small sizes the automatic chunk covers the whole batch and nothing is saved,
    so a mid-size run would test nothing."""
    from benchmarks.kd_loss import main

    report = main(["--chunk-size", "512", "--repeats", "1", "--out", str(tmp_path / "bench.json")])
    assert all(report["pass"].values()), report
