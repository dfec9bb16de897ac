"""The chunked SSD scan, the decode step and the document-aware conv against their definitions (float64)."""

import pytest
import torch
import torch.nn.functional as F

from zebra.model.ops.ssd import (causal_conv1d_torch, conv_step, ssd_chunked_scan, ssd_sequential_reference,
                                 ssd_step)

DT = torch.float64
CHUNK = 16
L = 53  # > 3 chunks, not a multiple of the chunk size


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_inputs(b=2, length=L, h=4, p=8, n=6, g=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, h, p, generator=gen, dtype=DT)
    dt = F.softplus(torch.randn(b, length, h, generator=gen, dtype=DT))
    A = -(torch.rand(h, generator=gen, dtype=DT) * 0.5 + 0.05)
    B = torch.randn(b, length, g, n, generator=gen, dtype=DT)
    C = torch.randn(b, length, g, n, generator=gen, dtype=DT)
    D = torch.randn(h, generator=gen, dtype=DT)
    state = torch.randn(b, h, p, n, generator=gen, dtype=DT)
    return x, dt, A, B, C, D, state


def doc_labels(b=2, length=L):
    """Row 0: boundaries inside chunks (7, 40), exactly on one (16) and one token long (31); row 1: one
    boundary, with labels that are not 0, 1, 2 ... (only changes matter)."""
    seq = torch.zeros(b, length, dtype=torch.long)
    for start in (7, 16, 31, 32, 40):
        seq[0, start:] += 1
    seq[1, :] = 5
    seq[1, 29:] = 9
    return seq


@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("with_docs", [False, True])
def test_chunked_scan_matches_recurrence(with_init, with_docs):
    x, dt, A, B, C, D, state = make_inputs()
    init = state if with_init else None
    seq = doc_labels() if with_docs else None
    y_ref, s_ref = ssd_sequential_reference(x, dt, A, B, C, D, initial_state=init, seq_idx=seq)
    y, s = ssd_chunked_scan(x, dt, A, B, C, D, initial_state=init, seq_idx=seq, chunk_size=CHUNK)
    assert rel(y, y_ref) < 1e-10
    assert rel(s, s_ref) < 1e-10


def test_document_reset_equals_documents_alone():
    """With seq_idx, each document's outputs equal the document scanned alone (the initial state goes to
    the first document only); this pins the definition the reference implements."""
    x, dt, A, B, C, D, state = make_inputs(b=1)
    seq = doc_labels()[:1]
    y, final = ssd_chunked_scan(x, dt, A, B, C, D, initial_state=state, seq_idx=seq, chunk_size=CHUNK)
    bounds = [0, 7, 16, 31, 32, 40, L]
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        init = state if i == 0 else None
        y_doc, f_doc = ssd_sequential_reference(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, initial_state=init)
        assert rel(y[:, s:e], y_doc) < 1e-10
    assert rel(final, f_doc) < 1e-10


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 256])
def test_chunk_size_does_not_matter(chunk_size):
    x, dt, A, B, C, D, state = make_inputs()
    seq = doc_labels()
    y_ref, s_ref = ssd_sequential_reference(x, dt, A, B, C, D, initial_state=state, seq_idx=seq)
    y, s = ssd_chunked_scan(x, dt, A, B, C, D, initial_state=state, seq_idx=seq, chunk_size=chunk_size)
    assert rel(y, y_ref) < 1e-10 and rel(s, s_ref) < 1e-10


def test_step_by_step_decode_equals_chunked():
    x, dt, A, B, C, D, state = make_inputs()
    y_full, s_full = ssd_chunked_scan(x, dt, A, B, C, D, initial_state=state, chunk_size=CHUNK)
    s, ys = state.clone(), []
    for t in range(L):
        y_t, s = ssd_step(s, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y_t)
    assert rel(torch.stack(ys, 1), y_full) < 1e-10
    assert rel(s, s_full) < 1e-10


def test_split_scan_continues_from_final_state():
    x, dt, A, B, C, D, _ = make_inputs()
    y_full, s_full = ssd_chunked_scan(x, dt, A, B, C, D, chunk_size=CHUNK)
    cut = 21
    y1, s1 = ssd_chunked_scan(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], D, chunk_size=CHUNK)
    y2, s2 = ssd_chunked_scan(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], D, initial_state=s1,
                              chunk_size=CHUNK)
    assert rel(torch.cat([y1, y2], 1), y_full) < 1e-10 and rel(s2, s_full) < 1e-10


def test_zero_steps_are_inert():
    """dt = 0 at a token leaves the state untouched (how the mixer keeps pads out)."""
    x, dt, A, B, C, D, state = make_inputs()
    dt = dt.clone()
    dt[:, :9] = 0
    _, s_all = ssd_chunked_scan(x, dt, A, B, C, D, initial_state=state, chunk_size=CHUNK)
    _, s_tail = ssd_chunked_scan(x[:, 9:], dt[:, 9:], A, B[:, 9:], C[:, 9:], D, initial_state=state,
                                 chunk_size=CHUNK)
    assert rel(s_all, s_tail) < 1e-12


def test_chunked_scan_gradients_match_recurrence():
    x, dt, A, B, C, D, state = make_inputs(length=37)
    seq = doc_labels(length=37)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, state)]
    weight = torch.randn(2, 37, 4, 8, dtype=DT)

    def grads(fn, **kw):
        y, s = fn(*leaves[:6], initial_state=leaves[6], seq_idx=seq, **kw)
        return torch.autograd.grad((y * weight).sum() + s.pow(2).sum(), leaves)

    g_ref = grads(ssd_sequential_reference)
    g = grads(ssd_chunked_scan, chunk_size=8)
    for a, r in zip(g, g_ref):
        assert rel(a, r) < 1e-10


def test_low_precision_inputs_computed_in_fp32():
    x, dt, A, B, C, D, state = make_inputs()
    y_ref, _ = ssd_chunked_scan(x, dt, A, B, C, D, chunk_size=CHUNK)
    y, s = ssd_chunked_scan(x.bfloat16(), dt.float(), A.float(), B.bfloat16(), C.bfloat16(), D.float(),
                            chunk_size=CHUNK)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel(y.double(), y_ref) < 3e-2


# ---------------------------------------------------------------------------------------------------
# conv
# ---------------------------------------------------------------------------------------------------

def conv_inputs(b=2, length=L, d=12, w=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    xBC = torch.randn(b, length, d, generator=gen, dtype=DT)
    weight = torch.randn(d, w, generator=gen, dtype=DT)
    bias = torch.randn(d, generator=gen, dtype=DT)
    return xBC, weight, bias


@pytest.mark.parametrize("activation", [False, True])
def test_conv_matches_nn_conv1d(activation):
    xBC, weight, bias = conv_inputs()
    ref = F.conv1d(xBC.transpose(1, 2), weight[:, None], bias, padding=3, groups=12)[..., :L].transpose(1, 2)
    if activation:
        ref = F.silu(ref)
    assert rel(causal_conv1d_torch(xBC, weight, bias, activation=activation), ref) < 1e-12


def test_conv_taps_never_cross_documents():
    xBC, weight, bias = conv_inputs(b=1)
    seq = doc_labels()[:1]
    out = causal_conv1d_torch(xBC, weight, bias, seq_idx=seq)
    bounds = [0, 7, 16, 31, 32, 40, L]
    for s, e in zip(bounds[:-1], bounds[1:]):
        assert rel(out[:, s:e], causal_conv1d_torch(xBC[:, s:e], weight, bias)) < 1e-12


def test_conv_continues_from_state_and_steps():
    xBC, weight, bias = conv_inputs()
    full = causal_conv1d_torch(xBC, weight, bias)
    cut = 10
    state = xBC[:, cut - 4:cut].transpose(1, 2)  # last d_conv inputs, oldest first
    assert rel(causal_conv1d_torch(xBC[:, cut:], weight, bias, conv_state=state), full[:, cut:]) < 1e-12
    # token by token from an empty window
    state, outs = torch.zeros(2, 12, 4, dtype=DT), []
    for t in range(L):
        o, state = conv_step(xBC[:, t], state, weight, bias)
        outs.append(o)
    assert rel(torch.stack(outs, 1), full) < 1e-12


@pytest.mark.parametrize("with_docs", [False, True])
def test_kernel_backend_always_gets_a_seq_idx(monkeypatch, with_docs):
    # mamba_ssm autotunes per key, and its key records whether seq_idx is given: padded rows (DPO, prefill) must
    # reach the kernels as packed rows do, labelled 0, 1, ... per row (tests/gpu checks the kernels' numbers)
    import types

    from zebra.model.ops import ssd

    seen = {}

    def fake_scan(x, dt, A, B, C, chunk_size, D=None, initial_states=None, seq_idx=None, **kw):
        seen["seq_idx"] = seq_idx
        return torch.zeros_like(x), torch.zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1])

    monkeypatch.setattr(ssd, "mamba_ssm_kernels", lambda: types.SimpleNamespace(chunk_scan=fake_scan))
    b, L, h, p, n = 2, 10, 2, 4, 3
    x, dt, A, B, C, D = (torch.randn(b, L, h, p), torch.rand(b, L, h), -torch.rand(h), torch.randn(b, L, h, n),
                         torch.randn(b, L, h, n), torch.randn(h))
    docs = torch.tensor([[5] * 4 + [9] * 6, [3] * 10]) if with_docs else None
    ssd.chunk_scan(x, dt, A, B, C, D, 4, seq_idx=docs, backend="mamba_ssm")
    expected = torch.tensor([[0] * 4 + [1] * 6, [0] * 10]) if with_docs else torch.zeros(b, L, dtype=torch.long)
    assert seen["seq_idx"].dtype == torch.int32 and seen["seq_idx"].is_contiguous()
    assert torch.equal(seen["seq_idx"].long(), expected)
