"""The tiny pipeline end to end: exports, reports, skip/re-run logic, and KD beating the untrained hybrid."""

from __future__ import annotations

import json

import pytest
import torch

from zebra.stages.run import run


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, data_files):
    from stage_helpers import compose_cfg, tiny_overrides

    root = tmp_path_factory.mktemp("pipeline")
    extra = ["kd.optimizer.lr=2e-3", "kd.tokens=512", "kd.heldout_batches=2", "dpo.optimizer.lr=1e-4"]
    cfg = compose_cfg(tiny_overrides(root, data_files, extra))
    summary = run(cfg)
    return root, cfg, summary, extra


def test_pipeline_exports_and_reports(pipeline_run):
    root, cfg, summary, _ = pipeline_run
    assert [summary[s]["skipped"] for s in ("ilkd", "smart", "kd", "dpo")] == [False] * 4
    base = root / "tiny"
    for d in (base / "ilkd" / "mla" / "model", base / "ilkd" / "mamba" / "model", base / "2mla-uniform" / "kd" / "model",
              base / "2mla-uniform" / "dpo" / "model"):
        assert (d / "config.json").is_file() and (d / "model.safetensors").is_file(), d
        assert (d / "tokenizer_config.json").is_file() and (d / "README.md").is_file()
    card = (base / "2mla-uniform" / "kd" / "model" / "README.md").read_text()
    for needle in ("MLA layers | [0, 2]", "KV cache vs base", "parameters", "random:0", "quantised", "tokens trained"):
        assert needle in card, needle
    smart = json.loads((base / "smart" / "sensitivity.json").read_text())
    assert len(smart["scores"]) == 4 and set(smart["selections"]) == {"1", "2"}
    assert (base / "smart" / "sensitivity.png").is_file()
    for rep_path in (base / "ilkd" / "report.json", base / "2mla-uniform" / "kd" / "report.json",
                     base / "2mla-uniform" / "dpo" / "report.json"):
        rep = json.loads(rep_path.read_text())
        assert rep["tokens_seen"] > 0 and rep["wall_seconds"] > 0 and rep["loss_last"] is not None
    kd = json.loads((base / "2mla-uniform" / "kd" / "report.json").read_text())
    assert kd["kv_fraction"] == pytest.approx(2 * (16 + 8) / (4 * 2 * 2 * 16)) and kd["params"] > 0
    assert not list(root.rglob(".tmp-*")), "temporary export directories left behind"
    # throughput/MFU callback logged
    metrics = (base / "2mla-uniform" / "kd" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "perf/tokens_per_s" in metrics and "perf/mfu" in metrics


def test_kd_lowers_heldout_kl_to_teacher(pipeline_run):
    _, _, summary, _ = pipeline_run
    before, after = summary["kd"]["heldout_kl_before"], summary["kd"]["heldout_kl_after"]
    assert before is not None and after is not None
    assert after < 0.9 * before, (before, after)


def test_exported_hybrid_loads_with_auto_classes(pipeline_run):
    import zebra  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    root, *_ = pipeline_run
    model = AutoModelForCausalLM.from_pretrained(root / "tiny" / "2mla-uniform" / "dpo" / "model")
    assert model.config.hybrid_layer_types == ["mla", "mamba", "mla", "mamba"]
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
    assert torch.isfinite(out.logits).all()


def test_pipeline_skips_finished_stages_and_reruns_changed_ones(pipeline_run, data_files):
    from stage_helpers import compose_cfg, tiny_overrides

    root, _, _, extra = pipeline_run
    again = run(compose_cfg(tiny_overrides(root, data_files, extra)))
    assert all(again[s]["skipped"] for s in ("ilkd", "smart", "kd", "dpo"))
    changed = run(compose_cfg(tiny_overrides(root, data_files, extra + ["dpo.module.beta=0.05"])))
    assert [changed[s]["skipped"] for s in ("ilkd", "smart", "kd", "dpo")] == [True, True, True, False]
