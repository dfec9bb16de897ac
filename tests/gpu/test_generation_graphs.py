"""CUDA-graph decode of the generation benchmark (benchmarks.generation) on the lent GPU: pytest -m gpu.

At small shapes, for the hybrid and for the Llama base in the benchmark's own harness (runners, Step capture):
a replayed CUDA graph of the decode step gives the eager step's logits; the static-cache path gives the ordinary
decode's (dynamic cache) logits within bf16 tolerance; in fp32 the kernels (mamba_ssm selective_state_update with
its own softplus, both decode-attention kernels) agree with the PyTorch path; allocator-measured cache bytes equal
the tensors' sizes; and the whole harness runs end to end (--smoke on CUDA).
"""

import json

import pytest
import torch

from benchmarks.generation import run as gen
from zebra.model import ZebraConfig
from zebra.model.ops.dispatch import mamba_backend
from zebra.model.ops.ssd import state_update

pytestmark = pytest.mark.gpu

SMALL = {
    "name": "small",
    "base": dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 max_position_embeddings=8192,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 1024}),
    "mla": dict(q_lora_rank=128, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                mla_rope="pairs", mamba_chunk_size=64),
    "paper_mla_layers": [0, 2],
}
RUNNERS = ["zebra", "llama"]


@pytest.fixture(autouse=True)
def kernels(monkeypatch):
    monkeypatch.delenv("ZEBRA_MAMBA_KERNELS", raising=False)
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    assert mamba_backend(ZebraConfig(), "cuda") == "mamba_ssm", "mamba_ssm must import on the GPU machine"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def runner(name, dtype=torch.bfloat16):
    return gen.RUNNERS[name](SMALL, "cuda", dtype, 0)


def decode(r, kernel, graph, batch=3, context=200, steps=6, seed=5):
    """Logits of `steps` forced tokens decoded over a seeded random cache, eagerly or by graph replay."""
    dev = gen.Device("cuda")
    cache = r.new_cache(batch, context + 64)
    ids = torch.zeros(batch, 1, dtype=torch.long, device="cuda")
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    r.set_kernel(kernel)
    fn = r.make_step(cache, ids, pos, greedy=False)
    step = gen.Step(dev, fn, warmup=2) if graph else None  # warm-up + capture advance the cache: refill below
    torch.manual_seed(seed)
    r.fill_random(cache, context)
    r.set_position(cache, pos, context)
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(steps):
        ids.copy_(torch.randint(0, r.config.vocab_size, (batch, 1), device="cuda", generator=g))
        if graph:
            res = step.run()  # a replay returns nothing: the logits are the graph's static output
            out.append((step.output if step.output is not None else res).clone())
        else:
            out.append(fn().clone())
    if step is not None:
        step.close()
    return torch.cat(out, 1)


@pytest.mark.parametrize("kernel", gen.DECODE_KERNELS)
@pytest.mark.parametrize("name", RUNNERS)
def test_graph_replay_equals_eager_step(name, kernel):
    r = runner(name)
    with torch.inference_mode():
        eager = decode(r, kernel, graph=False)
        replay = decode(r, kernel, graph=True)
    assert torch.isfinite(replay).all()
    assert rel(replay, eager) < 1e-2


@pytest.mark.parametrize("name", RUNNERS)
def test_static_graph_decode_equals_ordinary_decode(name):
    """The harness's own check: graph-replayed static decode after a real prefill, against the ordinary eager
    decode (HybridCache grown by concatenation / transformers' DynamicCache with SDPA)."""
    r = runner(name)
    args = gen.parse_args(["--device", "cuda", "--check-prompt", "150", "--check-steps", "6", "--chunk", "64"])
    bench = gen.Bench(args, {"models": {}}, None)
    with torch.inference_mode():
        for kernel in gen.DECODE_KERNELS:
            bench.args.kernels = [kernel]
            rec = bench.check(r)
            assert rec["graph"] and rec["finite"]
            assert rec["rel_err"] < 5e-2, (kernel, rec)


@pytest.mark.parametrize("name", RUNNERS)
def test_fp32_kernels_agree_with_torch_path(name):
    """fp32: the decode-attention kernels agree with each other, and the hybrid's Mamba2 step through mamba_ssm
    (softplus(dt + dt_bias) inside selective_state_update) agrees with the PyTorch step."""
    r = runner(name, torch.float32)
    with torch.inference_mode():
        ref = decode(r, "sdpa", graph=False)
        assert rel(decode(r, "matmul", graph=True), ref) < 1e-4
        if name == "zebra":
            r.model.config.mamba_kernels = "torch"
            assert rel(decode(r, "sdpa", graph=False), ref) < 1e-4


def test_cache_bytes_from_the_allocator_match_the_tensors():
    args = gen.parse_args(["--device", "cuda", "--batch", "4", "--cache-lengths", "512,4096"])
    bench = gen.Bench(args, {"models": {}}, None)
    out = {}
    with torch.inference_mode():
        for name in RUNNERS:
            r = runner(name)
            out[name] = bench.cache_bytes(r)
            held = [sum(p.values()) for p in out[name]["tensor_bytes"]]
            for alloc, tensors in zip(out[name]["allocated"], held):
                assert abs(alloc - tensors) <= 0.01 * tensors, (name, alloc, tensors)
            if name == "zebra":
                expected = r.describe()["expected"]
    measured = out["zebra"]["per_token"] / out["llama"]["per_token"]
    assert abs(measured - expected["kv_fraction"]) <= 0.01 * expected["kv_fraction"]
    assert out["zebra"]["constant_per_sequence"] > 0  # Mamba2 states: per sequence, not per token


def test_harness_smoke_on_cuda(tmp_path):
    out = tmp_path / "gen.json"
    res = gen.main(["--smoke", "--device", "cuda", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["models"]) == {"zebra", "llama"}
    for name in RUNNERS:
        m = saved["models"][name]
        assert "error" not in m and "errors" not in m, (m.get("error"), m.get("errors"))
        assert m["check"]["graph"] and m["check"]["rel_err"] < 5e-2
        assert all("tokens_per_s" in r and r["graph"] for r in m["decode"]), m["decode"]
        assert all("tokens_per_s" in r for r in m["prefill"]), m["prefill"]
        assert m["max_batch"]["batch"] >= 1 and m["max_batch"]["decode"]
    assert res["summary"]["kv_fraction"]["rel_err"] < 0.01


def test_state_update_with_raw_dt_and_bias():
    """The lean decode step: raw dt and dt_bias into selective_state_update (its own softplus) against the
    PyTorch step in float64."""
    torch.manual_seed(2)
    b, h, p, n = 3, 8, 64, 64
    state = torch.randn(b, h, p, n, device="cuda")
    x = torch.randn(b, h, p, device="cuda", dtype=torch.bfloat16)
    dt = torch.randn(b, h, device="cuda", dtype=torch.bfloat16) - 2  # raw, as in_proj gives it
    dt_bias = torch.randn(h, device="cuda")
    A = -torch.empty(h, device="cuda").uniform_(1, 16)
    B = torch.randn(b, h, n, device="cuda", dtype=torch.bfloat16)
    C = torch.randn(b, h, n, device="cuda", dtype=torch.bfloat16)
    D = torch.randn(h, device="cuda")
    s_ref = state.double()
    y_ref = state_update(s_ref, x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                         dt_bias=dt_bias.double())
    s_k = state.clone()
    y_k = state_update(s_k, x, dt, A, B, C, D, backend="mamba_ssm", dt_bias=dt_bias)
    assert rel(y_k, y_ref) < 1e-2 and rel(s_k, s_ref) < 1e-3
