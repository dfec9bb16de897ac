"""The CUDA-graph-friendly decode path: a static HybridCache written at a device `cache_position`.

It must give the full forward's logits (float64), the same as the dynamic cache, with padding too, and its step
must be replayable: no host syncs (no `.item()`, `bool(tensor)`, `int(tensor)`: all of them go through
aten._local_scalar_dense), the same op shapes at every position, and a position tensor advanced in place between
calls as a replayed CUDA graph would see it. (tests/gpu/test_generation_graphs.py replays real graphs on a GPU.)
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from test_modeling import make_model, rel  # the same tiny float64 models (tests/model)
from zebra.model.ops.decode_attention import DECODE_SPLIT_MIN, DECODE_SPLITS, decode_attention
from zebra.model.ops.dispatch import DECODE_KERNELS

MIXES = {"mla": ["mla", "mla"], "mamba": ["mamba", "mamba"], "mixed": ["mla", "mamba", "mamba", "mla"]}


class SyncAndShapeRecorder(TorchDispatchMode):
    """Records every op's name and output shapes; host reads of tensor values show up as _local_scalar_dense."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((str(func), tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def static_decode(model, ids, prefill, max_length, chunked_static=False):
    """Prefill `prefill` tokens (eagerly, or through cache_position when chunked_static), then decode the rest
    one token at a time through the static path with one position tensor advanced in place."""
    b, n = ids.shape
    cache = model.make_cache(b, max_length=max_length)
    if chunked_static:
        out = model(ids[:, :prefill], past_key_values=cache, cache_position=torch.arange(prefill))
    else:
        out = model(ids[:, :prefill], past_key_values=cache)
    logits = [out.logits]
    pos = torch.tensor([prefill])
    for t in range(prefill, n):
        logits.append(model(ids[:, t:t + 1], past_key_values=cache, cache_position=pos).logits)
        pos.add_(1)
    return torch.cat(logits, 1)


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("chunked_static,prefill", [(False, 7), (True, 7), (True, 20)])
def test_static_decode_equals_full_forward(mix, chunked_static, prefill):
    """prefill 20 > mla_absorb_max_tokens: the static path's materialised attention."""
    model = make_model(MIXES[mix])
    ids = torch.randint(0, 97, (2, 30))
    full = model(ids, use_cache=False).logits
    got = static_decode(model, ids, prefill=prefill, max_length=40, chunked_static=chunked_static)
    assert rel(got, full) < 1e-10


@pytest.mark.parametrize("mix", MIXES)
def test_static_decode_from_an_empty_cache(mix):
    """Every token through the one-token step, from slot 0 (Mamba2 steps from zero states)."""
    model = make_model(MIXES[mix])
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids, use_cache=False).logits
    cache = model.make_cache(2, max_length=16)
    pos = torch.zeros(1, dtype=torch.long)
    steps = []
    for t in range(12):
        steps.append(model(ids[:, t:t + 1], past_key_values=cache, cache_position=pos).logits)
        pos.add_(1)
    assert rel(torch.cat(steps, 1), full) < 1e-10


@pytest.mark.parametrize("kernel", ["matmul", "sdpa"])
def test_static_decode_equals_dynamic_cache(kernel):
    model = make_model(MIXES["mixed"], mla_decode_attention=kernel)
    ids = torch.randint(0, 97, (3, 20))
    dyn_cache = model.make_cache(3)
    dyn = [model(ids[:, :9], past_key_values=dyn_cache).logits[:, -1:]]
    dyn += [model(ids[:, t:t + 1], past_key_values=dyn_cache).logits for t in range(9, 20)]
    got = static_decode(model, ids, prefill=9, max_length=24)[:, 8:]
    assert rel(got, torch.cat(dyn, 1)) < 1e-10


@pytest.mark.parametrize("mix", MIXES)
def test_left_padded_static_decode_equals_sequences_alone(mix):
    model = make_model(MIXES[mix])
    lengths, total, slots = [14, 9, 12], 18, 24
    seqs = [torch.randint(0, 97, (1, n)) for n in lengths]
    pad = max(lengths)
    ids = torch.zeros(len(seqs), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), slots, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, pad - s.shape[1]:] = s[0]
        mask[i, pad - s.shape[1]:total] = 1  # the slots the decoded tokens will take are real too
    new = torch.randint(0, 97, (len(seqs), total - pad))
    cache = model.make_cache(len(seqs), max_length=slots)
    out = model(ids, attention_mask=mask, past_key_values=cache, cache_position=torch.arange(pad))
    logits = [out.logits[:, -1:]]
    pos = torch.tensor([pad])
    for t in range(total - pad):
        logits.append(model(new[:, t:t + 1], attention_mask=mask, past_key_values=cache, cache_position=pos).logits)
        pos.add_(1)
    logits = torch.cat(logits, 1)
    for i, s in enumerate(seqs):
        alone = model(torch.cat([s, new[i:i + 1]], 1), use_cache=False).logits[:, s.shape[1] - 1:]
        assert rel(logits[i:i + 1], alone) < 1e-10


def test_decode_step_has_no_host_sync_and_fixed_shapes():
    model = make_model(MIXES["mixed"])
    b, slots = 2, 32
    cache = model.make_cache(b, max_length=slots)
    model(torch.randint(0, 97, (b, 5)), past_key_values=cache)
    ids, pos = torch.randint(0, 97, (b, 1)), torch.tensor([5])

    def step():
        logits = model(ids, past_key_values=cache, cache_position=pos, logits_to_keep=1).logits
        ids.copy_(logits[:, -1].argmax(-1, keepdim=True))  # greedy, on the device
        pos.add_(1)
        return logits

    traces = []
    for _ in range(3):
        with SyncAndShapeRecorder() as rec:
            step()
        traces.append(rec.ops)
    names = {name for trace in traces for name, _ in trace}
    assert not any("_local_scalar_dense" in n or "is_nonzero" in n or "item" in n for n in names), names
    assert not any(n.startswith(("aten.nonzero", "aten.masked_select")) for n in names)
    assert traces[0] == traces[1] == traces[2]  # same ops, same shapes: one recorded graph fits every step


def test_cache_position_needs_a_static_cache():
    model = make_model(MIXES["mixed"])
    with pytest.raises(ValueError, match="static"):
        model(torch.randint(0, 97, (1, 1)), past_key_values=model.make_cache(1), cache_position=torch.tensor([0]))


@pytest.mark.parametrize("s", [100, DECODE_SPLIT_MIN + 3 * DECODE_SPLITS])
@pytest.mark.parametrize("kernel", DECODE_KERNELS)
def test_decode_attention_kernels(s, kernel):
    """Every kernel (the split values GEMM for long S included; Triton's interpreted on CPU) against the
    definition, with the values a strided view of the keys as MLA passes its latents."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    k = torch.randn(2, 3, s, 16, dtype=torch.float64)
    v = k[..., :12]
    mask = torch.rand(2, 1, 1, s) > 0.3
    mask[..., 0] = True
    scores = (q @ k.transpose(-1, -2)) * 0.25
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    # the Triton kernel keeps its scores and running softmax in fp32 whatever the inputs (as on the GPU)
    assert rel(decode_attention(q, k, v, mask, 0.25, kernel), ref) < (1e-6 if kernel == "triton" else 1e-12)


def test_static_step_computes_rope_and_slot_mask_once_for_all_mla_layers(monkeypatch):
    """The static step shares the RoPE cos/sin and the slot mask of its first MLA layer with the others (8 small
    kernels a layer at decode); with padding the shared mask is each row's own, so the padded decode stays right
    (test_left_padded_static_decode_equals_sequences_alone)."""
    from zebra.model import mla

    model = make_model(MIXES["mixed"])
    calls = {"rope": 0, "mask": 0}
    rope_forward, mask_fn = type(model.model.layers[0].mixer.rotary_emb).forward, mla.static_attention_mask

    def counting_rope(self, *a, **k):
        calls["rope"] += 1
        return rope_forward(self, *a, **k)

    def counting_mask(*a, **k):
        calls["mask"] += 1
        return mask_fn(*a, **k)

    monkeypatch.setattr(type(model.model.layers[0].mixer.rotary_emb), "forward", counting_rope)
    monkeypatch.setattr(mla, "static_attention_mask", counting_mask)
    ids = torch.randint(0, 97, (2, 12))
    full = model(ids, use_cache=False).logits
    calls.update(rope=0, mask=0)
    got = static_decode(model, ids, prefill=9, max_length=16)
    assert rel(got, full) < 1e-10
    assert calls == {"rope": 2 + 3, "mask": 3}  # the eager prefill's two MLA layers, then one per static step
