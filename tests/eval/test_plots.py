"""Plots: KV cache across mixes from the model presets, loss curves from CSV logs / reports, SMART chart."""

import json
from pathlib import Path

import pytest

from zebra.eval.plots import (kv_cache_across_mixes, load_model_preset, plot_kv_cache, plot_loss_curves, plot_smart,
                              stage_curves)

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
PNG = b"\x89PNG\r\n\x1a\n"


def test_kv_cache_across_mixes_matches_method():
    smol = kv_cache_across_mixes(load_model_preset(CONF / "smollm2_135m.yaml"))
    assert smol["num_layers"] == 30 and len(smol["rows"]) == 30
    assert smol["rows"][5]["kv_fraction"] == pytest.approx(0.05)  # METHOD: 6 * 96 / (30 * 384)
    assert smol["rows"][-1]["kv_fraction"] == pytest.approx(96 / 384)
    one_b = kv_cache_across_mixes(load_model_preset(CONF / "zebra_1b.yaml"))
    assert one_b["rows"][3]["kv_fraction"] == pytest.approx(4 * 160 / (16 * 1024))  # 3.906% (1B 4MLA-12M2)
    assert one_b["paper_n_mla"] == 4
    per_token = [r["cache_bytes_per_token"] for r in one_b["rows"]]
    assert per_token == sorted(per_token) and one_b["base_kv_bytes_per_token"] == 16 * 2 * 8 * 64 * 2


def test_plot_kv_cache(tmp_path):
    png, data = plot_kv_cache([CONF / "tiny.yaml", CONF / "smollm2_135m.yaml"], tmp_path / "kv.png",
                              highlight={"smollm2_135m": 6})
    assert Path(png).read_bytes()[:8] == PNG and [d["name"] for d in data] == ["tiny", "smollm2_135m"]


def test_loss_curves_from_csv_and_report(tiny_run, tmp_path):
    kd = stage_curves(tiny_run / "2mla" / "kd")
    assert set(kd) == {"loss", "kl_per_token"} and kd["loss"][0] == (0.0, 5.0) and len(kd["loss"]) == 20
    ilkd = stage_curves(tiny_run / "ilkd")  # no CSV: the report's loss_history
    assert ilkd == {"loss (report.json)": [(0.0, 3.0), (1.0, 2.0), (2.0, 1.5), (3.0, 1.2)]}
    png = plot_loss_curves({"ilkd": tiny_run / "ilkd", "kd": tiny_run / "2mla" / "kd",
                            "dpo": tiny_run / "2mla" / "dpo"}, tmp_path / "loss.png")
    assert Path(png).read_bytes()[:8] == PNG
    assert plot_loss_curves({"dpo": tiny_run / "2mla" / "dpo"}, tmp_path / "none.png") is None


def test_smart_chart(tiny_run, tmp_path):
    png = plot_smart(tiny_run / "smart", tmp_path / "smart")
    assert Path(png).read_bytes()[:8] == PNG
    assert json.loads((tmp_path / "smart" / "sensitivity.json").read_text())["selections"] == {"2": [0, 2]}
    assert plot_smart(tmp_path / "nowhere", tmp_path / "x") is None
