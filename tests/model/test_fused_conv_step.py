"""The fused Triton conv decode step against the torch step (zebra.model.ops.ssd.conv_step, itself tested against the
full causal conv), on CPU tensors under Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from zebra.model.ops.ssd import conv_step


@pytest.fixture
def fused():
    """The kernel, interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET before torch imports Triton)."""
    from zebra.model.ops.fused_conv_step import fused_conv_update, interpreting

    assert interpreting() or torch.cuda.is_available()

    return fused_conv_update


@pytest.mark.parametrize("dtype,state_width,activation,bias", [
    (torch.float32, 4, True, True), (torch.float32, 6, False, True), (torch.float16, 4, True, False),
    (torch.float64, 3, True, True)])
def test_fused_step_equals_torch_step_over_several_tokens(fused, dtype, state_width, activation, bias):
    g = torch.Generator().manual_seed(0)
    b, d, w = 3, 300, 3 if state_width == 3 else 4  # 300 channels: two blocks, the second partial
    weight = torch.randn(d, w, generator=g).to(dtype)
    bias_t = torch.randn(d, generator=g).to(dtype) if bias else None
    state_ref = torch.randn(b, d, state_width, generator=g).to(dtype)
    state = state_ref.clone()
    for _ in range(3):  # the window shifts: later tokens read what earlier ones wrote
        x = torch.randn(b, d, generator=g).to(dtype)
        want, state_ref = conv_step(x, state_ref, weight, bias_t, activation)
        got = fused(x, state, weight, bias_t, activation)
        tol = 2e-3 if dtype == torch.float16 else 1e-6
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(state, state_ref, rtol=0, atol=0)
    assert got.dtype == dtype


def test_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from zebra.model.ops.fused_conv_step import fused_conv_update

    with pytest.raises(ValueError, match="CUDA"):
        fused_conv_update(torch.zeros(1, 4), torch.zeros(1, 4, 4), torch.zeros(4, 4))
