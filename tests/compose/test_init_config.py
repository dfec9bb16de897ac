"""The init options and the rope key from Hydra: reachable, hashed into the ilkd stage, wired into its students,
and each student's own ILD losses in the report."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.stages.stage_helpers import compose_cfg, tiny_overrides, write_preferences, write_sft
from zebra.compose.calibration import check_init_options
from zebra.stages import artifacts
from zebra.stages.errors import StageError
from zebra.stages.run import run

NEW = ["init.mla_svd=activation_aware", "init.mamba_conv=identity", "init.mamba_scale=matched",
       "init.calibration_rows=3", "model.mla.rope_key=per_kv_head"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"sft": write_sft(d / "sft.jsonl"), "pref": write_preferences(d / "pref.jsonl")}


def make_cfg(root, data_files, *extra):
    return compose_cfg(tiny_overrides(root, data_files, list(extra)))


def test_every_option_is_reachable_and_hashed(tmp_path, data_files):
    default = make_cfg(tmp_path, data_files)
    assert set(default.init) == {"mla_svd", "calibration_rows", "mamba_conv", "mamba_scale"}
    assert default.model.mla.rope_key in ("shared", "per_kv_head")
    check_init_options(OmegaConf.to_container(default.init), from_config=True)
    hashes = {artifacts.stage_hash(default, "ilkd")}
    for override in ("init.mla_svd=plain", "init.mla_svd=activation_aware", "init.mamba_conv=default",
                     "init.mamba_conv=identity", "init.mamba_scale=none", "init.mamba_scale=matched",
                     "model.mla.rope_key=shared", "model.mla.rope_key=per_kv_head"):
        cfg = make_cfg(tmp_path, data_files, override)
        key, value = override.split("=")
        assert OmegaConf.select(cfg, key) == value
        check_init_options(OmegaConf.to_container(cfg.init), from_config=True)
        hashes.add(artifacts.stage_hash(cfg, "ilkd"))
    assert len(hashes) == 5  # the default, and the other value of each of the four options


def test_bad_option_stops_ilkd_before_any_model_loads(tmp_path, data_files):
    with pytest.raises(StageError, match="init.mla_svd"):
        run(make_cfg(tmp_path, data_files, "stage=ilkd", "init.mla_svd=svd"))
    with pytest.raises(StageError, match="calibration_rows"):
        run(make_cfg(tmp_path, data_files, "stage=ilkd", "init.mamba_scale=matched", "init.calibration_rows=0"))
    assert not list(tmp_path.rglob("model.safetensors"))


@pytest.mark.slow
def test_ilkd_with_the_new_inits_reports_each_students_own_losses(tmp_path, data_files):
    cfg = make_cfg(tmp_path, data_files, "stage=ilkd", "ilkd.tokens=128", *NEW)
    report = run(cfg)
    students = report["students"]
    for kind in ("mla", "mamba"):
        assert students[kind]["loss_first"] is not None
    # the stage's loss is the students' sum; each student reports its own share
    assert students["mla"]["loss_first"] + students["mamba"]["loss_first"] == pytest.approx(report["loss_first"])
    assert students["mla"]["loss_last"] + students["mamba"]["loss_last"] == pytest.approx(report["loss_last"])
    assert students["mla"]["loss_first"] != students["mamba"]["loss_first"]
    assert students["mla"]["init_errors"]["mla_svd"] == "activation_aware"
    assert students["mamba"]["init_errors"]["mamba_conv"] == "identity"
    assert students["mamba"]["init_errors"]["calibration_tokens"] > 0
    # the rope key is architecture: saved in the export's config and back through from_pretrained
    mla = artifacts.load(cfg, "ilkd", part="mla")
    assert mla.config.rope_key == "per_kv_head"
    g, r, d = mla.config.num_key_value_heads, mla.config.kv_lora_rank, mla.config.qk_rope_head_dim
    assert mla.model.layers[0].mixer.kv_a_proj.weight.shape[0] == r + g * d
    # per KV head, the KV fraction counts g rope keys per MLA layer (all-MLA student: every layer)
    assert students["mla"]["kv_fraction"] == pytest.approx((r + g * d) / (2 * g * mla.config.head_dim))
