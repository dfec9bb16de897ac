"""The generation benchmark's harness on CPU (--smoke): tiny shapes, the same code path as the GPU run except
that steps are called eagerly instead of replayed from a CUDA graph. Times mean nothing here; the structure of
the results, the cache measurement and the decode check do."""

import json
from pathlib import Path

import pytest

from benchmarks.generation import models, report
from benchmarks.generation import run as gen
from benchmarks.harness import Device


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "generation_bench.json"
    res = gen.main(["--smoke", "--device", "cpu", "--out", str(out)])
    return res, json.loads(out.read_text())


@pytest.mark.slow
def test_both_models_measured(smoke):
    res, saved = smoke
    assert saved["summary"] == json.loads(json.dumps(res["summary"], default=str))
    contexts = saved["meta"]["args"]["contexts"]
    for name in ("zebra", "llama"):
        m = saved["models"][name]
        assert "error" not in m and "errors" not in m, (m.get("error"), m.get("errors"))
        assert [r["context"] for r in m["prefill"]] == contexts
        assert all(r["tokens_per_s"] > 0 for r in m["prefill"])
        decode = m["decode"]
        kernels = saved["meta"]["args"]["kernels"]
        assert "triton" in kernels  # interpreted on CPU (tests/conftest.py)
        assert {(r["context"], r["kernel"]) for r in decode} == {(c, k) for c in contexts for k in kernels}
        for r in decode:
            assert r["tokens_per_s"] > 0 and r["roofline_bytes"] > r["weights_bytes"] > 0
        mb = m["max_batch"]
        assert mb["batch"] == gen.SMOKE_ARGS["max_batch_cap"] and mb["capped"]
        assert mb["decode"] and all(r["batch"] == mb["batch"] for r in mb["decode"])
    for key in ("kv_fraction", "decode_batch", "max_batch", "max_batch_decode", "prefill_ratio", "checks"):
        assert key in saved["summary"], key


@pytest.mark.slow
def test_cache_bytes_ratio_is_kv_fraction(smoke):
    _, saved = smoke
    z, l = saved["models"]["zebra"], saved["models"]["llama"]
    expected = z["expected"]["kv_fraction"]
    cfg = models.zebra_config(models.SMOKE_PRESET)
    assert expected == pytest.approx(len(cfg.mla_layers) * cfg.mla_cache_dim
                                     / (2 * cfg.num_key_value_heads * cfg.head_dim * cfg.num_hidden_layers))
    measured = z["cache"]["per_token"] / l["cache"]["per_token"]
    assert abs(measured - expected) <= 0.01 * expected
    assert saved["summary"]["checks"]["kv_fraction_rel_err"]["pass"]
    # Mamba2 states are per sequence: the hybrid's constant part, the base has none
    assert z["cache"]["constant_per_sequence"] > 0 and l["cache"]["constant_per_sequence"] == 0


@pytest.mark.slow
def test_static_step_equals_ordinary_decode(smoke):
    """The harness's check: the benchmark's static-cache step (what the GPU records in a graph) against the
    ordinary decode (dynamic cache), after a real prefill, for both models."""
    _, saved = smoke
    for name in ("zebra", "llama"):
        check = saved["models"][name]["check"]
        assert check["finite"] and check["token_agreement"] == 1.0
        assert check["rel_err"] < 1e-5, (name, check)


@pytest.mark.slow
def test_plots(smoke, tmp_path):
    out = tmp_path / "gen.json"
    out.write_text(json.dumps(smoke[1]))
    paths = report.plot(out, tmp_path)
    assert len(paths) == 2 and all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in paths)


def test_sticky_device_error_stops_the_run_and_keeps_what_was_measured(tmp_path, monkeypatch):
    """A CUDA error that poisons the context (illegal address at the hybrid's largest-batch decode, seen on an H200)
    stops the benchmark with the error named, the JSON holding what came before, and the other model not started
    (its every call would fail with the same error)."""
    out = tmp_path / "g.json"
    real_step, real_decode = gen.Step.__init__, gen.Bench.decode
    armed = []

    def step_init(self, dev, fn, warmup, **options):
        if armed:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        real_step(self, dev, fn, warmup, **options)

    def decode(self, runner, context, batch, kernels, headroom_check=False):
        if headroom_check:  # the decode at the largest batch found (after the fit trials)
            armed.append(True)
        return real_decode(self, runner, context, batch, kernels, headroom_check=headroom_check)

    monkeypatch.setattr(gen.Step, "__init__", step_init)
    monkeypatch.setattr(gen.Bench, "decode", decode)
    with pytest.raises(SystemExit, match="illegal memory access") as err:
        gen.main(["--smoke", "--device", "cpu", "--contexts", "16", "--out", str(out)])
    assert "zebra decode at context" in str(err.value)
    saved = json.loads(out.read_text())
    assert "illegal memory access" in saved["stopped"]
    z = saved["models"]["zebra"]
    assert z["decode"] and all("tokens_per_s" in r for r in z["decode"])  # measured before the error, kept
    assert "illegal memory access" in z["errors"]["max_batch"]
    assert "llama" not in saved["models"]


def test_step_keeps_its_function_and_closure_alive_until_closed():
    """A CUDA graph reads its inputs by address: a tensor held only by the step's closure (the base's slot indices)
    must live as long as the graph, or its memory is reused and the replay reads garbage (seen on an H200: the
    base's graphed step read a prefill's activations as its attention mask). Step holds the function until close."""
    import gc
    import weakref

    import torch

    def make():
        slots = torch.arange(8)
        return (lambda: (slots <= 3).sum()), weakref.ref(slots)

    fn, slots_ref = make()
    step = gen.Step(Device("cpu"), fn, warmup=1)
    assert int(step.run()) == 4
    # on CUDA `run` is the graph's replay, which holds no Python reference to the function: stand in for it, so
    # that only the Step's own hold on the function keeps the closure's tensor alive
    step.run = lambda: None
    del fn
    gc.collect()
    assert slots_ref() is not None
    step.close()
    gc.collect()
    assert slots_ref() is None


@pytest.mark.slow
def test_compiled_steps_pass_the_check_and_are_timed(tmp_path):
    """--compile: each model's decode step goes through torch.compile (dynamic shapes) before it is run (captured
    on a GPU); the compiled step must agree with the ordinary eager decode like the plain one, compile without a
    recompile per step (the hybrid's host-side token counters), and be the one timed."""
    import torch

    torch._dynamo.utils.counters.clear()
    out = tmp_path / "gen.json"
    res = gen.main(["--smoke", "--device", "cpu", "--compile", "--contexts", "16", "--kernels", "matmul",
                    "--skip-max-batch", "--out", str(out)])
    assert res["meta"]["args"]["compile"] is True
    for name in ("zebra", "llama"):
        m = res["models"][name]
        assert "errors" not in m, m.get("errors")
        assert m["check"]["pass"] and m["check"]["rel_err"] < 1e-5, m["check"]
        assert [r["context"] for r in m["decode"]] == [16] and m["decode"][0]["tokens_per_s"] > 0
    # one graph per Step (check + decode, two models): a static-shape compile made one per step of the hybrid
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4, dict(torch._dynamo.utils.counters["stats"])
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
