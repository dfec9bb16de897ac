"""The fused SiLU-gate kernel against the float64 definition and the MLP's eager path, on CPU tensors under
Triton's interpreter (the same kernel source that runs on the GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture
def fused():
    from zebra.model.ops.fused_mlp import fused_silu_mul, interpreting

    assert interpreting() or torch.cuda.is_available()
    return fused_silu_mul


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_silu_mul_equals_the_definition(fused, dtype, tol):
    """silu(g) u = g u / (1 + exp(-g)) in float64, over more elements than one program (1024) takes, a ragged
    last block, large negative and positive gates."""
    gen = torch.Generator().manual_seed(0)
    gate, up = 6 * torch.randn(3, 1, 1500, generator=gen), torch.randn(3, 1, 1500, generator=gen)
    want = gate.double() * up.double() / (1 + torch.exp(-gate.double()))
    got = fused(gate.to(dtype), up.to(dtype))
    assert got.shape == gate.shape and got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_bf16_within_its_two_roundings_of_the_eager_mlp(fused):
    """In bf16 the eager MLP rounds SiLU's output before the product, and the product; the kernel rounds at the
    same two places. Triton's interpreter rounds toward zero where the GPU rounds to nearest, so here the kernel
    is held to two bf16 steps (2^-6 relative) of the eager result; on the GPU, tests/gpu/test_fused_kernels.py
    asks for the eager bits."""
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(8, 1, 2048, generator=gen).bfloat16() for _ in range(2))
    eager = (F.silu(gate) * up).float()
    got = fused(gate, up)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - eager).abs() <= 2 ** -6 * eager.abs() + 1e-30).all()


def test_refuses_mismatched_inputs(fused):
    with pytest.raises(ValueError, match="fused_silu_mul"):
        fused(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="fused_silu_mul"):
        fused(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float64))
