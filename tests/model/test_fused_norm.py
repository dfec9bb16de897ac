"""The fused (residual add +) RMSNorm kernel against ZebraRMSNorm's eager path, on CPU tensors under Triton's
interpreter; and the decoder layer's use of it (the eager path with the residual argument is the old layer)."""

from __future__ import annotations

import pytest
import torch

from zebra.model.modeling_zebra import ZebraRMSNorm


@pytest.fixture
def fused():
    from zebra.model.ops.fused_norm import fused_rms_norm, interpreting

    assert interpreting() or torch.cuda.is_available()
    return fused_rms_norm


def make_norm(h, dtype, seed=0):
    torch.manual_seed(seed)
    norm = ZebraRMSNorm(h, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(h, dtype=dtype))
    return norm


@pytest.mark.parametrize("dtype,h", [(torch.float32, 96), (torch.float16, 576), (torch.float64, 64)])
def test_fused_norm_equals_eager(fused, dtype, h):
    norm = make_norm(h, dtype)
    g = torch.Generator().manual_seed(1)
    x, res = torch.randn(2, 3, h, generator=g).to(dtype), torch.randn(2, 3, h, generator=g).to(dtype)
    tol = {torch.float16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-6}[dtype]  # the kernel's rms is fp32
    with torch.no_grad():
        want = norm(x)
        want_normed, want_sum = norm(x, residual=res)
    torch.testing.assert_close(fused(x, norm.weight, norm.eps), want, rtol=tol, atol=tol)
    got_normed, got_sum = fused(x, norm.weight, norm.eps, res)
    torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=0)  # the add rounds exactly as eager
    torch.testing.assert_close(got_normed, want_normed, rtol=tol, atol=tol)
    assert got_normed.dtype == want_normed.dtype and got_sum.dtype == want_sum.dtype


def test_mixed_dtypes_follow_eager_promotion(fused):
    """An fp32 (trained) norm weight after bf16-like activations, as in a ZeRO-1/2 mixed-precision model: the
    output takes the promoted dtype, like the eager `weight * rms_norm(x)`."""
    norm = make_norm(64, torch.float32)
    x = torch.randn(4, 64).half()
    with torch.no_grad():
        want = norm(x)
    got = fused(x, norm.weight, norm.eps)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_decoder_layer_with_residual_norm_is_the_old_layer():
    """`post_attention_layernorm(mixed, residual=h)` returns (norm(h + mixed), h + mixed): the layer computes what
    `h = h + mixed; h + mlp(norm(h))` did."""
    norm = make_norm(32, torch.float64)
    h, mixed = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    normed, summed = norm(mixed, residual=h)
    assert torch.equal(summed, h + mixed)
    assert torch.equal(normed, norm(h + mixed))
