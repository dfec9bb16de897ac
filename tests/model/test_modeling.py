"""Whole-model tests: cached decoding equals the full forward, padding and packing, save/load, generate."""

import subprocess
import sys

import pytest
import torch

from zebra.model import ZebraConfig, ZebraForCausalLM

MIXES = {
    "mla": ["mla", "mla", "mla"],
    "mamba": ["mamba", "mamba", "mamba"],
    "mixed": ["mla", "mamba", "mla"],
}


def make_model(layer_types, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ZebraConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(layer_types),
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, q_lora_rank=32, kv_lora_rank=24,
                      qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, mamba_chunk_size=16,
                      hybrid_layer_types=layer_types, **kw)
    model = ZebraForCausalLM(cfg).to(dtype).eval()
    # Random SSM decay and norms so that the state and gates are exercised, not just their init values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def decode_step_by_step(model, ids, attention_mask=None):
    cache = model.make_cache(ids.shape[0])
    logits = []
    for t in range(ids.shape[1]):
        am = attention_mask[:, : t + 1] if attention_mask is not None else None
        out = model(ids[:, t : t + 1], attention_mask=am, past_key_values=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_cached_decoding_equals_full_forward(mix, dtype, tol):
    model = make_model(MIXES[mix], dtype)
    ids = torch.randint(0, 97, (1, 40))
    full = model(ids, use_cache=False).logits
    assert rel(decode_step_by_step(model, ids), full) < tol


@pytest.mark.parametrize("mix", MIXES)
def test_left_padded_batch_decoding_equals_sequences_alone(mix):
    model = make_model(MIXES[mix])
    lengths = [40, 29, 35]
    seqs = [torch.randint(0, 97, (1, n)) for n in lengths]
    total = max(lengths)
    ids = torch.zeros(len(seqs), total, dtype=torch.long)
    mask = torch.zeros(len(seqs), total, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, total - s.shape[1]:] = s[0]
        mask[i, total - s.shape[1]:] = 1
    # prefill of a prefix, then token-by-token decoding, on the padded batch
    prefix = 33
    cache = model.make_cache(len(seqs))
    parts = [model(ids[:, :prefix], attention_mask=mask[:, :prefix], past_key_values=cache, use_cache=True).logits]
    for t in range(prefix, total):
        parts.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                           use_cache=True).logits)
    batched = torch.cat(parts, 1)
    full_batched = model(ids, attention_mask=mask, use_cache=False).logits
    for i, s in enumerate(seqs):
        alone = model(s, use_cache=False).logits[0]
        n = s.shape[1]
        assert rel(batched[i, total - n:], alone) < 1e-10
        assert rel(full_batched[i, total - n:], alone) < 1e-10


@pytest.mark.parametrize("mix", MIXES)
def test_packed_rows_equal_documents_alone(mix):
    model = make_model(MIXES[mix])
    docs = [torch.randint(0, 97, (1, n)) for n in (17, 23, 20)]
    row = torch.cat(docs, 1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    packed = model(row, position_ids=pos, use_cache=False).logits[0]
    start = 0
    for d in docs:
        alone = model(d, use_cache=False).logits[0]
        assert rel(packed[start:start + d.shape[1]], alone) < 1e-10
        start += d.shape[1]


def test_logits_to_keep_and_hidden_states():
    model = make_model(MIXES["mixed"])
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids, use_cache=False, output_hidden_states=True)
    last = model(ids, use_cache=False, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last[:, 0], full.logits[:, -1])
    assert len(full.hidden_states) == model.config.num_hidden_layers + 1


def test_save_pretrained_round_trip_is_bit_exact(tmp_path):
    import zebra  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    model = make_model(MIXES["mixed"], torch.float32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ZebraForCausalLM
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype, k
        assert torch.equal(sd[k], sd2[k]), k
    ids = torch.randint(0, 97, (2, 10))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_ssm_parameters_stay_fp32_in_bf16():
    model = make_model(MIXES["mixed"], torch.float32).to(torch.bfloat16)
    mixer = model.model.layers[1].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32
    assert model.model.layers[1].mixer.in_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("mix", ["mixed"])
def test_greedy_generate_same_with_and_without_cache(mix):
    model = make_model(MIXES[mix], torch.float64)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left-padded second row
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, attention_mask=mask)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (2, 21)
    assert torch.equal(with_cache, without)


def test_gradient_checkpointing_gives_same_gradients():
    model = make_model(MIXES["mixed"]).train()
    ids = torch.randint(0, 97, (2, 20))
    loss = model(ids, labels=ids, use_cache=False).loss
    g1 = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    model.gradient_checkpointing_enable()
    loss2 = model(ids, labels=ids, use_cache=False).loss
    g2 = torch.autograd.grad(loss2, list(model.parameters()), allow_unused=True)
    assert torch.allclose(loss, loss2)
    for a, b in zip(g1, g2):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_model_package_imports_no_training_stack():
    code = ("import sys, zebra.model; bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', "
            "'deepspeed') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
