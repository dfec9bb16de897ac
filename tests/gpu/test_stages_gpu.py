"""Every stage on a GPU through plain Lightning, as a user runs it (`python train.py stage=<s> trainer=gpu`), on
the real embedded teacher: ilkd -> smart -> kd -> dpo for a few steps each with the default configs (bf16-mixed,
fused AdamW, clipping at global norm 1.0), then kd again under DeepSpeed ZeRO-2. Run on the lent GPU:
`pytest -m gpu tests/gpu/test_stages_gpu.py`.

The stages run in order in one artifacts root (each reads the previous one's export), so the tests of this module
depend on each other's order, as the pipeline's stages do.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import subprocess_env, train
from tests.helpers.clipping import Tiny, fit_one_step, fused_adamw

pytestmark = pytest.mark.gpu

STEPS = 4
COMMON = ["trainer=gpu", "logger=csv", "trainer.enable_progress_bar=false", "check_weights_moved=true"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-artifacts")


def run_stage(root: Path, *args: str) -> subprocess.CompletedProcess:
    return train([*args, *COMMON], env=subprocess_env(ZEBRA_ROOT=str(root)), timeout=600)


def report(root: Path, *parts: str) -> dict:
    return json.loads((root / "smollm2_135m" / Path(*parts) / "report.json").read_text())


def assert_trained(rep: dict, steps: int = STEPS) -> None:
    assert rep["steps"] == steps, rep
    assert math.isfinite(rep["loss_first"]) and math.isfinite(rep["loss_last"]), rep
    moved = rep.get("weights_moved")
    assert moved is not None and moved["unchanged"] == [], moved


@pytest.fixture(autouse=True)
def needs_cuda():
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"


def test_fused_adamw_clipped_to_norm_one_on_cuda():
    """The clipping hook on the device itself: bf16 autocast, fused CUDA AdamW, gradients clipped to norm 1.0."""
    torch.manual_seed(0)
    module = Tiny(optimizer=fused_adamw)
    fit_one_step(module, "bf16-mixed", accelerator="gpu", steps=2)
    assert len(module.norms) == 2
    for before, after in module.norms:
        assert before > 100.0 and after == pytest.approx(1.0, rel=1e-3)


def test_ilkd(root):
    run_stage(root, "stage=ilkd", f"ilkd.max_steps={STEPS}")
    rep = report(root, "ilkd")
    assert_trained(rep)
    for kind in ("mla", "mamba"):
        assert (root / "smollm2_135m" / "ilkd" / kind / "model" / "config.json").is_file()


def test_smart(root):
    run_stage(root, "stage=smart")
    sens = json.loads((root / "smollm2_135m" / "smart" / "sensitivity.json").read_text())
    assert sens, "SMART wrote no sensitivities"


def kd_dir(root: Path) -> Path:
    found = sorted((root / "smollm2_135m").glob("*/kd/report.json"))
    assert len(found) == 1, found
    return found[0].parent


def test_kd(root):
    run_stage(root, "stage=kd", f"kd.max_steps={STEPS}")
    rep = json.loads((kd_dir(root) / "report.json").read_text())
    assert_trained(rep)
    assert rep["heldout_kl_after"] < rep["heldout_kl_before"], rep


def test_dpo(root):
    run_stage(root, "stage=dpo", f"dpo.pairs={2 * STEPS}")
    rep = json.loads((kd_dir(root).parent / "dpo" / "report.json").read_text())
    assert_trained(rep)


def test_kd_deepspeed_zero2(root):
    run_stage(root, "stage=kd", f"kd.max_steps={STEPS}", "strategy=deepspeed_zero2", "force=true")
    rep = json.loads((kd_dir(root) / "report.json").read_text())
    assert_trained(rep)
    assert rep["heldout_kl_after"] < rep["heldout_kl_before"], rep
