"""`describe` reproduces the paper's KV fractions and parameter counts from the presets (METHOD §2.4)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from zebra.plan.describe import describe

CONF = Path(__file__).resolve().parents[2] / "conf"

# model preset -> (KV fraction to 4 significant digits, params in billions, paper's MLA indices)
PAPER = {
    "zebra_1b": (0.03906, 1.286, [0, 5, 10, 14]),
    "zebra_3b": (0.02009, 3.390, [0, 5, 10, 16, 21, 26]),
    "zebra_8b": (0.02734, 8.379, [0, 4, 8, 12, 16, 20, 25, 30]),
}
# the 50% mixes: even layers
EVEN = {"zebra_1b": (0.07812, 1.267), "zebra_3b": (0.04688, 3.269), "zebra_8b": (0.05469, 8.186)}


def compose(model: str, mix: str, **mix_overrides):
    cfg = OmegaConf.create({
        "model": OmegaConf.load(CONF / "model" / f"{model}.yaml"),
        "mix": OmegaConf.load(CONF / "mix" / f"{mix}.yaml"),
        "paths": {"root": "/nonexistent"},
    })
    for k, v in mix_overrides.items():
        cfg.mix[k] = v
    return cfg


@pytest.mark.parametrize("model", PAPER)
def test_paper_mixes(model):
    kv, params_b, layers = PAPER[model]
    info = describe(compose(model, "paper"))
    assert float(f"{info['kv_fraction']:.4g}") == kv
    assert abs(info["params"] / 1e9 - params_b) / params_b < 0.005
    assert info["mla_layers"] == layers
    assert info["layer_types"].count("mla") == len(layers)


@pytest.mark.parametrize("model", EVEN)
def test_half_mla_mixes(model):
    kv, params_b = EVEN[model]
    layers = OmegaConf.load(CONF / "model" / f"{model}.yaml").base.num_hidden_layers
    info = describe(compose(model, "uniform", n_mla=layers // 2))
    assert info["mla_layers"] == list(range(0, layers, 2))
    assert float(f"{info['kv_fraction']:.4g}") == kv
    assert abs(info["params"] / 1e9 - params_b) / params_b < 0.005


def test_smollm2_default_mix_is_five_percent():
    info = describe(compose("smollm2_135m", "smart"))  # before SMART has run: placement is uniform
    assert info["layer_types"].count("mla") == 6
    assert info["kv_fraction"] == pytest.approx(0.05, abs=1e-9)
