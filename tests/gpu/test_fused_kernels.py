"""The fused inference kernels on the GPU (pytest -m gpu): decode of a small hybrid with them (the default for
inference with the GPU kernels) against the same decode with `config.fused_kernels` off (eager add + RMSNorm, torch
conv step, eager decay and mamba_ssm's state update), in fp32 and bf16; and each kernel against its reference on
CUDA tensors."""

import pytest
import torch

from zebra.model import ZebraConfig, ZebraForCausalLM
from zebra.model.ops.flash_decode import flash_decode
from zebra.model.ops.fused_conv_step import fused_conv_update
from zebra.model.ops.fused_mlp import fused_silu_mul
from zebra.model.ops.fused_norm import fused_rms_norm
from zebra.model.ops.fused_state_update import fused_state_update
from zebra.model.ops.ssd import conv_step, ssd_step

pytestmark = pytest.mark.gpu
DEV = "cuda"


def small_hybrid(dtype):
    torch.manual_seed(0)
    cfg = ZebraConfig(vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, q_lora_rank=128, kv_lora_rank=64,
                      qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, mamba_chunk_size=64,
                      hybrid_layer_types=["mla", "mamba", "mamba", "mla"])
    return ZebraForCausalLM(cfg).to(DEV, dtype).eval()


def decode(model, ids, steps=6):
    cache = model.make_cache(ids.shape[0])
    with torch.inference_mode():
        out = [model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].float()]
        tok = out[-1].argmax(-1, keepdim=True)
        for _ in range(steps):
            out.append(model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].float())
            tok = out[-1].argmax(-1, keepdim=True)
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_fused_decode_equals_eager_decode(monkeypatch, dtype, tol):
    monkeypatch.delenv("ZEBRA_FUSED_KERNELS", raising=False)
    model = small_hybrid(dtype)
    ids = torch.randint(0, 500, (3, 40), device=DEV, generator=torch.Generator(DEV).manual_seed(1))
    fused = decode(model, ids)
    model.config.fused_kernels = False
    eager = decode(model, ids)
    rel = ((fused - eager).norm() / eager.norm()).item()
    assert rel < tol, rel


def test_kernels_on_cuda_against_references():
    g = torch.Generator(DEV).manual_seed(2)
    x, res, w = (torch.randn(4, 1, 512, device=DEV, generator=g) for _ in range(3))
    normed, summed = fused_rms_norm(x, w[0, 0], 1e-5, res)
    want_sum = res + x
    torch.testing.assert_close(summed, want_sum)
    torch.testing.assert_close(normed, w[0, 0] * torch.nn.functional.rms_norm(want_sum, (512,), eps=1e-5),
                               rtol=1e-5, atol=1e-5)
    state = torch.randn(2, 300, 4, device=DEV, generator=g)
    xs, wt, b = torch.randn(2, 300, device=DEV, generator=g), torch.randn(300, 4, device=DEV, generator=g), \
        torch.randn(300, device=DEV, generator=g)
    want, want_state = conv_step(xs, state.clone(), wt, b)
    torch.testing.assert_close(fused_conv_update(xs, state, wt, b), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state)
    st = torch.randn(2, 8, 64, 64, device=DEV, generator=g)
    xg, B, C = (torch.randn(2, 2, 64, device=DEV, generator=g), torch.randn(2, 2, 64, device=DEV, generator=g),
                torch.randn(2, 8, 64, device=DEV, generator=g))
    dt, a_log, D, dtb = (torch.randn(2, 8, device=DEV, generator=g), torch.rand(8, device=DEV, generator=g),
                         torch.randn(8, device=DEV, generator=g), torch.randn(8, device=DEV, generator=g))
    want_y, want_st = ssd_step(st.clone(), xg.repeat_interleave(4, 1), dt, -torch.exp(a_log), B, C, D, dt_bias=dtb)
    torch.testing.assert_close(fused_state_update(st, xg, dt, a_log, B, C, D, dt_bias=dtb), want_y, rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(st, want_st, rtol=1e-4, atol=1e-4)
    gate, up = (torch.randn(8, 1, 14336, device=DEV, generator=g).bfloat16() for _ in range(2))
    assert (fused_silu_mul(gate, up) == torch.nn.functional.silu(gate) * up).float().mean() > 0.999  # eager's bits
    q, k = torch.randn(2, 8, 4, 128, device=DEV, generator=g), torch.randn(2, 8, 5000, 128, device=DEV, generator=g)
    mask = (torch.arange(5000, device=DEV) < 4700)[None, None, None]
    ref = torch.softmax((q @ k.transpose(-1, -2) / 11.3).masked_fill(~mask, float("-inf")), -1) @ k
    torch.testing.assert_close(flash_decode(q, k, k, mask, 1 / 11.3), ref, rtol=2e-4, atol=2e-4)


def test_flash_decode_batch_offsets_past_2_31_elements():
    """The last batch row of a cache whose batch stride x batch passes 2**31 elements (the generation benchmark's
    zebra_8b at 32k x 738 crashed with an illegal address before the kernels took 64-bit batch offsets)."""
    torch.manual_seed(0)
    s, d, b = 64, 64, 3
    stride_b = 2**30 + 4096  # two batch steps pass 2**31 elements: 4 GiB of bf16 keys
    buf = torch.empty(b * stride_b, device=DEV, dtype=torch.bfloat16)
    k = buf.as_strided((b, 1, s, d), (stride_b, s * d, d, 1))
    k.copy_(torch.randn(b, 1, s, d, device=DEV, dtype=torch.bfloat16))
    v = torch.randn(b, 1, s, d, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(b, 1, 4, d, device=DEV, dtype=torch.bfloat16)
    out = flash_decode(q, k, v, None, d**-0.5).float()
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * d**-0.5, -1) @ v.double()
    torch.testing.assert_close(out, ref.float(), atol=2e-2, rtol=2e-2)


def test_latent_flash_decode_at_zebra_8b_shape_past_2_31_elements():
    """The latent kernel (MLA: values = the entries' first 160 columns) at zebra_8b's 32 heads x (160 + 64)
    columns, on a cache whose last batch row starts past 2**31 elements, with the static mask."""
    torch.manual_seed(1)
    s, r, dr, b = 700, 160, 64, 3
    stride_b = 2**30 + 4096
    buf = torch.empty(b * stride_b, device=DEV, dtype=torch.bfloat16)
    entries = buf.as_strided((b, 1, s, r + dr), (stride_b, s * (r + dr), r + dr, 1))
    entries.copy_(torch.randn(b, 1, s, r + dr, device=DEV, dtype=torch.bfloat16))
    q = torch.randn(b, 1, 32, r + dr, device=DEV, dtype=torch.bfloat16)
    mask = (torch.arange(s, device=DEV) < 650)[None, None, None]
    out = flash_decode(q, entries, entries[..., :r], mask, 0.07, latent=True).float()
    e = entries.double()
    scores = (q.double() @ e.transpose(-1, -2) * 0.07).masked_fill(~mask, float("-inf"))
    ref = torch.softmax(scores, -1) @ e[..., :r]
    torch.testing.assert_close(out, ref.float(), atol=2e-2, rtol=2e-2)
