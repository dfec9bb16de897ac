"""`run_eval(cfg)`, the `stage=eval` hook, on a config shaped like the composed Hydra config."""

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from zebra.eval.evaluate import run_eval

CONF = Path(__file__).resolve().parents[2] / "conf"


def make_cfg(model_dir, teacher, mix="2mla", model_preset=None, **eval_opts):
    model = OmegaConf.load(CONF / "model" / (model_preset or "tiny.yaml"))
    if teacher is not None:
        model.teacher = str(teacher)
        model.kd_teacher = str(teacher)
    return OmegaConf.create({
        "paths": {"model_dir": str(model_dir)},  # the stages' directories follow (zebra.stages.artifacts)
        "mix": {"name": mix, "selection": "explicit", "mla_layers": [0, 2], "n_mla": None},
        "model": model, "data": OmegaConf.load(CONF / "data" / "default.yaml"),
        "trainer": {"accelerator": "cpu"}, "teacher_dtype": "auto", "stage": {"name": "eval"},
        "eval": {"tasks": ["zebra_mc"], "limit": 4, "batch_size": 16, "seq_len": 64, "max_tokens": 128,
                 "sft_batches": 1, **eval_opts}})


def test_run_eval_writes_the_report(tiny_run, tiny_teacher_dir, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    report = run_eval(make_cfg(run, tiny_teacher_dir, long_context=True, lengths=[32], passkey_lengths=[96]))
    out = run / "2mla" / "eval"
    saved = json.loads((out / "report.json").read_text())
    assert saved["final"] == "dpo" and list(saved["models"]) == ["teacher", "assembled", "kd", "dpo"]
    assert saved["models"]["dpo"]["heldout_set"] == "sft"
    assert set(saved["long_context"]["models"]) == {"teacher", "dpo"}  # the final hybrid next to the teacher
    assert (out / "report.md").is_file() and (out / "long_context.png").is_file() and (out / "kv_cache.png").is_file()
    assert report["models"]["kd"]["lm_eval"]["tasks"]["zebra_mc"]["n"] == 4


def test_run_eval_before_kd_uses_the_mix_and_a_random_teacher(tiny_run, tmp_path):
    """Only the ILD exports exist: the assembled hybrid comes from cfg.mix; model=tiny's `random:0` teacher."""
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run / "ilkd", run / "ilkd")
    report = run_eval(make_cfg(run, None, tasks=[], heldout=["text"], plots=False))
    assert report["teacher"] == "random:0" and list(report["models"]) == ["teacher", "assembled"]
    assert report["models"]["assembled"]["mla_layers"] == [0, 2] and report["final"] is None
    assert report["models"]["assembled"]["heldout_kl"] > 0
