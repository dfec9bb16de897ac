"""Exact resume: a run killed at step k and resumed with ckpt_path=last logs the same losses, step for step, as an
uninterrupted run (CPU, same seed), because the checkpoint holds model, optimiser, scheduler and data position."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.stages.crash import KilledForTest
from zebra.stages.run import run

STEPS = ["stage=ilkd", "ilkd.students=mla", "ilkd.tokens=384", "ilkd.checkpoint_every_n_steps=1",
         "ilkd.optimizer.lr=1e-3", "ilkd.scheduler.warmup_ratio=0.3"]


def logged_losses(stage_dir: Path) -> dict[int, float]:
    out = {}
    for f in sorted((stage_dir / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def test_resume_matches_uninterrupted_run(make_cfg, tmp_path):
    full = run(make_cfg(*STEPS, root=tmp_path / "a"))
    assert full["steps"] == 6

    with pytest.raises(KilledForTest):
        run(make_cfg(*STEPS, "+callbacks.kill._target_=tests.stages.crash.StopAtStep", "+callbacks.kill.step=3",
                     root=tmp_path / "b"))
    b_dir = tmp_path / "b" / "tiny" / "ilkd"
    assert not (b_dir / "mla" / "model").exists(), "a killed run must not export"
    assert (b_dir / "checkpoints-mla" / "last.ckpt").is_file()
    assert sorted(logged_losses(b_dir)) == [0, 1, 2]

    resumed = run(make_cfg(*STEPS, "ckpt_path=last", root=tmp_path / "b"))
    assert resumed["steps"] == 6
    assert resumed["loss_history"] == full["loss_history"]  # bit-identical, step for step
    a_logged = logged_losses(tmp_path / "a" / "tiny" / "ilkd")
    b_logged = logged_losses(b_dir)
    assert sorted(b_logged) == list(range(6)) and b_logged == a_logged
    assert (b_dir / "mla" / "model" / "config.json").is_file()
    # retention: checkpoint.keep=1 step checkpoint, last.ckpt a link to it
    ckpts = b_dir / "checkpoints-mla"
    assert [p.name for p in ckpts.glob("step*.ckpt")] == ["step000006.ckpt"]
    assert (ckpts / "last.ckpt").is_symlink() and (ckpts / "last.ckpt").resolve().name == "step000006.ckpt"


def test_checkpoints_removed_after_the_stage_when_asked(make_cfg, tmp_path):
    """checkpoint.keep_after_stage=false (the smoke recipe's setting): the finished stage's checkpoints are gone,
    its export and report stay; the default keeps them."""
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    run(make_cfg(*STEPS, root=kept))
    run(make_cfg(*STEPS, "checkpoint.keep_after_stage=false", root=dropped))
    assert list((kept / "tiny" / "ilkd" / "checkpoints-mla").glob("*.ckpt"))
    assert not (dropped / "tiny" / "ilkd" / "checkpoints-mla").exists()
    assert (dropped / "tiny" / "ilkd" / "mla" / "model" / "model.safetensors").is_file()
    assert (dropped / "tiny" / "ilkd" / "report.json").is_file()
