"""mamba_ssm's CUDA kernels against our PyTorch SSD path (run on the lent GPU: pytest -m gpu).

The reference is our torch path in float64 on the same (bf16-rounded) values; the kernel path in bf16 must
stay within bf16 tolerance of it, in forward and in gradients (inputs and parameters), for packed prefill
(seq_idx) and for decode steps (selective_state_update).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from zebra.model.cache import MambaLayerCache
from zebra.model.configuration_zebra import ZebraConfig
from zebra.model.mamba2 import Mamba2Mixer
from zebra.model.ops.dispatch import mamba_backend
from zebra.model.ops.ssd import chunk_scan, ssd_chunked_scan, state_update

pytestmark = pytest.mark.gpu

FWD_TOL = 1e-2
GRAD_TOL = 3e-2


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    monkeypatch.delenv("ZEBRA_MAMBA_KERNELS", raising=False)
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    assert mamba_backend(ZebraConfig(), "cuda") == "mamba_ssm", "mamba_ssm must import on the GPU machine"


def doc_ids_for(b, length, starts):
    ids = torch.zeros(b, length, dtype=torch.long, device="cuda")
    for s in starts:
        ids[:, s:] += 1
    return ids


@pytest.mark.parametrize("starts", [[100, 256, 300, 301, 611], None], ids=["documents", "one_document"])
def test_chunk_scan_forward_and_gradients(starts):
    torch.manual_seed(0)
    b, L, h, p, n, chunk = 2, 700, 8, 64, 64, 256
    dev = "cuda"
    x = torch.randn(b, L, h, p, device=dev, dtype=torch.bfloat16)
    dt = F.softplus(torch.randn(b, L, h, device=dev) - 2)  # fp32, as the mixer passes it
    A = -torch.empty(h, device=dev).uniform_(1, 16)
    B = torch.randn(b, L, h, n, device=dev, dtype=torch.bfloat16) / n ** 0.5
    C = torch.randn(b, L, h, n, device=dev, dtype=torch.bfloat16) / n ** 0.5
    D = torch.randn(h, device=dev)
    # inside chunks, on a chunk edge, one-token docs; or none (chunk_scan then gives the kernels zeros)
    seq = None if starts is None else doc_ids_for(b, L, starts)
    w = torch.randn(b, L, h, p, device=dev)

    def run(backend, dtype):
        leaves = [(t if dtype is None else t.to(dtype)).detach().requires_grad_() for t in (x, dt, A, B, C, D)]
        y, final = chunk_scan(*leaves, chunk, seq_idx=seq, backend=backend)
        (y.double() * w.double()).sum().backward()
        return y, final, [t.grad for t in leaves]

    y_ref, s_ref, g_ref = run("torch", torch.float64)
    y_k, s_k, g_k = run("mamba_ssm", None)
    assert y_k.dtype == torch.bfloat16
    assert rel(y_k, y_ref) < FWD_TOL
    assert rel(s_k, s_ref) < FWD_TOL
    for name, gk, gr in zip("x dt A B C D".split(), g_k, g_ref):
        assert rel(gk, gr) < GRAD_TOL, name


def test_chunk_scan_initial_state_with_documents():
    torch.manual_seed(1)
    b, L, h, p, n = 2, 300, 4, 64, 64
    dev = "cuda"
    x = torch.randn(b, L, h, p, device=dev, dtype=torch.bfloat16)
    dt = F.softplus(torch.randn(b, L, h, device=dev) - 2)
    A = -torch.empty(h, device=dev).uniform_(1, 16)
    B = torch.randn(b, L, h, n, device=dev, dtype=torch.bfloat16) / n ** 0.5
    C = torch.randn(b, L, h, n, device=dev, dtype=torch.bfloat16) / n ** 0.5
    D = torch.randn(h, device=dev)
    s0 = torch.randn(b, h, p, n, device=dev)
    # labels start at 7, not 0: the initial state must still go to the first document
    seq = doc_ids_for(b, L, [40, 200]) + 7
    y_ref, f_ref = ssd_chunked_scan(x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                                    initial_state=s0.double(), seq_idx=seq, chunk_size=64)
    y_k, f_k = chunk_scan(x, dt, A, B, C, D, 64, initial_state=s0, seq_idx=seq, backend="mamba_ssm")
    assert rel(y_k, y_ref) < FWD_TOL and rel(f_k, f_ref) < FWD_TOL


def test_state_update_matches_step():
    torch.manual_seed(2)
    b, h, p, n = 3, 8, 64, 64
    dev = "cuda"
    state = torch.randn(b, h, p, n, device=dev)
    x = torch.randn(b, h, p, device=dev, dtype=torch.bfloat16)
    dt = F.softplus(torch.randn(b, h, device=dev))
    dt[0] = 0  # a pad: the state must not move
    A = -torch.empty(h, device=dev).uniform_(1, 16)
    B = torch.randn(b, h, n, device=dev, dtype=torch.bfloat16)
    C = torch.randn(b, h, n, device=dev, dtype=torch.bfloat16)
    D = torch.randn(h, device=dev)
    s_ref = state.double()
    y_ref = state_update(s_ref, x.double(), dt.double(), A.double(), B.double(), C.double(), D.double())
    s_k = state.clone()
    y_k = state_update(s_k, x, dt, A, B, C, D, backend="mamba_ssm")
    assert rel(y_k, y_ref) < FWD_TOL and rel(s_k, s_ref) < 1e-3
    assert torch.equal(s_k[0], state[0])


def small_mixer():
    torch.manual_seed(3)
    cfg = ZebraConfig(vocab_size=100, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, hybrid_layer_types=["mamba"],
                      mamba_chunk_size=64)
    m = Mamba2Mixer(cfg, 0)
    with torch.no_grad():
        m.in_proj.weight.normal_(0, 0.02)
        m.out_proj.weight.normal_(0, 0.02)
        m.norm.weight.add_(0.1 * torch.randn_like(m.norm.weight))
    return m.cuda().to(torch.bfloat16)


def test_mixer_packed_forward_and_gradients():
    """The whole layer in bf16, kernels vs our torch path, both against float64. Parameter gradients are sums
    over every token (dD = sum dy * x cancels heavily), so the kernels' error is judged against the error
    the torch path itself makes in bf16 rather than against a fixed bound."""
    m = small_mixer()
    ref = copy.deepcopy(m).double()
    m_torch = copy.deepcopy(m)
    b, L = 2, 400
    h = torch.randn(b, L, 512, device="cuda")
    doc_ids = doc_ids_for(b, L, [50, 64, 250])
    w = torch.randn(b, L, 512, device="cuda")

    def run(module, dtype):
        inp = h.to(dtype).requires_grad_()
        out = module(inp, doc_ids=doc_ids)
        (out.double() * w.double()).sum().backward()
        return {"out": out, "input": inp.grad, **{n: p.grad for n, p in module.named_parameters()}}

    got_k = run(m, torch.bfloat16)
    m_torch.config.mamba_kernels = "torch"  # its own copy of the config
    got_t = run(m_torch, torch.bfloat16)
    want = run(ref, torch.float64)
    for name in want:
        err_k, err_t = rel(got_k[name], want[name]), rel(got_t[name], want[name])
        print(f"{name:16s} kernels {err_k:.2e}  torch-bf16 {err_t:.2e}")
        assert err_k < (FWD_TOL if name == "out" else GRAD_TOL) or err_k < 1.5 * err_t, name


def test_mixer_prefill_then_decode():
    m = small_mixer()
    ref = copy.deepcopy(m).double()
    b, L, cut = 2, 150, 130
    h = torch.randn(b, L, 512, device="cuda")
    mask = torch.ones(b, L, dtype=torch.long, device="cuda")
    mask[1, :17] = 0  # left padding

    def run(module, dtype):
        cache = MambaLayerCache(b, module.conv_dim, module.d_conv, module.nheads, module.headdim, module.d_state,
                                dtype, "cuda")
        cache.ssm_state = cache.ssm_state.to(torch.promote_types(dtype, torch.float32))
        with torch.no_grad():
            outs = [module(h[:, :cut].to(dtype), attention_mask=mask[:, :cut], cache=cache)]
            for t in range(cut, L):
                outs.append(module(h[:, t:t + 1].to(dtype), attention_mask=mask[:, :t + 1], cache=cache))
        return torch.cat(outs, 1), cache.ssm_state

    out_k, state_k = run(m, torch.bfloat16)
    out_r, state_r = run(ref, torch.float64)  # float64: the torch path
    assert rel(out_k[:, cut:], out_r[:, cut:]) < FWD_TOL  # the decode steps
    assert rel(out_k, out_r) < FWD_TOL
    assert rel(state_k, state_r) < FWD_TOL
