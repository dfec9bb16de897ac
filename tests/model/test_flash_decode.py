"""The Triton split-key decode attention against a float64 reference written from the definition, run on CPU
tensors under Triton's interpreter (the same kernel source that runs on the GPU)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def flash():
    """The kernel, interpreted on CPU (tests/conftest.py sets TRITON_INTERPRET before torch imports Triton)."""
    from zebra.model.ops import flash_decode

    assert flash_decode.interpreting() or torch.cuda.is_available()

    return flash_decode.flash_decode


def reference(q, k, v, mask, scale):
    """softmax(scale q k^T) v over the allowed keys, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = scale * q @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.mark.parametrize("splits", [None, 1, 5])
def test_gqa_decode_over_static_slots(flash, splits):
    """The base's decode: 4 query heads per KV head, a [1, 1, 1, S] mask over the written slots of a static cache
    (the last 40 slots are unwritten garbage), split into key ranges of which the last see no key at all."""
    b, g, nq, s, d = 2, 2, 4, 300, 128
    q, k, v = rand(b, g, nq, d, seed=0), rand(b, g, s, d, seed=1), rand(b, g, s, d, seed=2)
    k[:, :, 260:] = 1e4  # unwritten slots: must not leak through the mask
    mask = (torch.arange(s) < 260)[None, None, None, :]
    got = flash(q, k, v, mask, d ** -0.5, splits=splits)
    want = reference(q, k, v, mask, d ** -0.5)
    assert got.shape == (b, g, nq, d) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_mla_absorbed_shapes_value_is_a_prefix_of_the_key(flash):
    """MLA's absorbed attention: one KV head, heads x tokens as query rows (more than one block of rows), keys of
    r_kv + d_rope columns (not a multiple of the column block), values a prefix view of the keys, a causal mask
    over the last tokens, no padding."""
    b, heads, t, s, r, d_rope = 2, 20, 4, 150, 48, 24
    entries = rand(b, s, r + d_rope, seed=3)
    k, v = entries[:, None], entries[:, None, :, :r]
    q = rand(b, 1, heads * t, r + d_rope, seed=4)
    causal = torch.ones(t, s, dtype=torch.bool).tril(s - t)  # token i sees keys up to s - t + i
    mask = causal[None, None].expand(b, heads, t, s).reshape(b, 1, heads * t, s)
    got = flash(q, k, v, mask, 0.1)
    want = reference(q, k, v, mask, 0.1)
    assert got.shape == (b, 1, heads * t, r)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_no_mask_and_half_precision(flash):
    b, g, nq, s, d, dv = 1, 3, 2, 97, 64, 32
    q, k, v = rand(b, g, nq, d, seed=5), rand(b, g, s, d, seed=6), rand(b, g, s, dv, seed=7)
    got = flash(q.half(), k.half(), v.half(), None, 0.125)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), reference(q.half(), k.half(), v.half(), None, 0.125),
                               rtol=2e-3, atol=2e-3)


def test_decode_attention_takes_the_triton_kernel(flash):
    from zebra.model.ops.decode_attention import decode_attention
    from zebra.model.ops.dispatch import DECODE_KERNELS

    assert "triton" in DECODE_KERNELS
    q, k, v = rand(1, 2, 4, 32, seed=8), rand(1, 2, 50, 32, seed=9), rand(1, 2, 50, 32, seed=10)
    mask = (torch.arange(50) < 33)[None, None, None]
    torch.testing.assert_close(decode_attention(q, k, v, mask, 0.2, "triton"),
                               decode_attention(q, k, v, mask, 0.2, "matmul"), rtol=1e-5, atol=1e-5)


def test_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from zebra.model.ops.flash_decode import flash_decode

    with pytest.raises(ValueError, match="CUDA"):
        flash_decode(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8), None, 1.0)


def test_split_count_keeps_several_ranges_per_row_at_a_large_batch():
    """One range per (batch, head) at a large batch left each program a serial loop over the whole cache (12.3 ms
    against 7.3 ms with 4 ranges at zebra_8b's 32k x 739 on an H200); a short cache still gets no empty range."""
    from zebra.model.ops.flash_decode import MIN_SPLITS, split_count

    cpu = torch.device("cpu")
    assert split_count(739, 1, 32832, 64, cpu) == MIN_SPLITS == 4
    assert split_count(1, 1, 100, 64, cpu) == 2  # only two blocks of keys
    assert split_count(739, 1, 32832, 64, cpu, splits=1) == 1  # an explicit count is kept


def test_combine_kernel_equals_the_torch_combine(flash):
    """The ranges' combine in one kernel against the torch ops it replaced, over many ranges (some that saw no key:
    a mask that ends early) and value columns that are not a power of two (MLA's 160)."""
    b, heads, s, r, d_rope = 2, 8, 700, 40, 24
    entries = rand(b, s, r + d_rope, seed=11)
    q = rand(b, 1, heads, r + d_rope, seed=12)
    mask = (torch.arange(s) < 130)[None, None, None]
    args = (q, entries[:, None], entries[:, None, :, :r], mask, 0.3)
    fused = flash(*args, splits=9)
    torch.testing.assert_close(fused, flash(*args, splits=9, torch_combine=True), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused.double(), reference(*args), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("r,d_rope,t,masked", [(160, 64, 1, "one_row"), (64, 32, 3, "per_row"), (40, 24, 1, None)])
def test_latent_kernel_reads_values_inside_the_keys(flash, r, d_rope, t, masked):
    """MLA's absorbed decode through the latent kernel (values = the entries' first r_kv columns, loaded once in
    power-of-two pieces): zebra_8b's 160 + 64 columns (128 + 32 + 64), a power-of-two r_kv (cut in halves) with
    several tokens and a per-row causal mask, and pieces padded to their power of two (40 -> 32 + 16, 24 -> 32),
    against the float64 reference and the general kernel (the same call with latent=False)."""
    from zebra.model.ops.flash_decode import latent_pieces

    b, heads, s = 2, 8, 333
    entries = rand(b, s, r + d_rope, seed=13)
    entries[:, 300:] = 1e4  # unwritten slots of a static cache: must not leak through the mask
    k, v = entries[:, None], entries[:, None, :, :r]
    q = rand(b, 1, heads * t, r + d_rope, seed=14)
    mask = None
    if masked == "one_row":
        mask = (torch.arange(s) < 300)[None, None, None]
    elif masked == "per_row":
        causal = torch.ones(t, s, dtype=torch.bool).tril(300 - t)
        mask = causal[None, None].expand(b, heads, t, s).reshape(b, 1, heads * t, s)
    else:
        entries[:, 300:] = rand(b, s - 300, r + d_rope, seed=15)  # no mask: every slot is a key
    assert latent_pieces(r + d_rope, r) is not None
    got = flash(q, k, v, mask, 0.07, splits=3, latent=True)
    assert got.shape == (b, 1, heads * t, r)
    torch.testing.assert_close(got.double(), reference(q, k, v, mask, 0.07), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got, flash(q, k, v, mask, 0.07, splits=3, latent=False), rtol=1e-5, atol=1e-5)


def test_latent_pieces_and_when_the_kernel_is_taken(flash, monkeypatch):
    from zebra.model.ops import flash_decode as fd
    from zebra.model.ops.flash_decode import latent_pieces, values_in_keys

    assert latent_pieces(224, 160) == (128, 32, 64)  # zebra_8b: no padding at all
    assert latent_pieces(96, 64) == (32, 32, 32)
    assert latent_pieces(40, 24) is None  # too few value columns for two pieces
    assert latent_pieces(64, 64) is None  # no key columns beyond the values
    entries = rand(1, 10, 96, seed=16)
    assert values_in_keys(entries[:, None], entries[:, None, :, :64])
    assert not values_in_keys(entries[:, None], entries[:, None, :, 32:])  # not the first columns
    assert not values_in_keys(entries[:, None], entries[:, None, :, :64].clone())  # a copy
    with pytest.raises(ValueError, match="latent=True"):
        flash(rand(1, 1, 4, 96, seed=17), entries[:, None], entries[:, None, :, :64].clone(), None, 1.0, latent=True)
    # by default (as MLA calls it) a prefix view takes the latent kernel and a copy the general one
    built = []
    for name in ("_latent_kernel", "_kernel"):
        real = getattr(fd, name)
        monkeypatch.setattr(fd, name, lambda interpret, real=real, name=name: built.append(name) or real(interpret))
    q = rand(1, 1, 4, 96, seed=17)
    flash(q, entries[:, None], entries[:, None, :, :64], None, 1.0)
    flash(q, entries[:, None], entries[:, None, :, :64].clone(), None, 1.0)
    assert built == ["_latent_kernel", "_kernel"]


def test_latent_kernel_half_precision(flash):
    b, heads, s, r, d_rope = 2, 16, 200, 160, 64
    entries = rand(b, s, r + d_rope, seed=18).half()
    q = rand(b, 1, heads, r + d_rope, seed=19).half()
    got = flash(q, entries[:, None], entries[:, None, :, :r], None, 0.05, latent=True)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), reference(q, entries[:, None], entries[:, None, :, :r], None, 0.05),
                               rtol=3e-3, atol=3e-3)
