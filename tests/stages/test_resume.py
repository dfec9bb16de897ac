"""Exact resume: a run killed at step k and resumed with ckpt_path=last logs the same losses, step for step, as an
uninterrupted run (CPU, same seed), because the checkpoint holds model, optimiser, scheduler and data position."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from stage_helpers import tiny_overrides
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


def test_a_checkpoint_of_another_config_is_refused_before_any_model_loads(make_cfg, tmp_path, monkeypatch):
    """ckpt_path=last never resumes a checkpoint that another config wrote (here: another learning rate): the error
    names the key and both values, before the teacher loads; another budget (more tokens) does resume."""
    import zebra.stages.ilkd as ilkd
    from zebra.stages.errors import StageError

    root = tmp_path / "r"
    with pytest.raises(KilledForTest):
        run(make_cfg(*STEPS, "+callbacks.kill._target_=tests.stages.crash.StopAtStep", "+callbacks.kill.step=3",
                     root=root))
    ckpts = root / "tiny" / "ilkd" / "checkpoints-mla"
    before = tree_bytes(ckpts)
    real_load = ilkd.load_teacher_model

    def no_teacher(*a, **k):
        raise AssertionError("the teacher loaded before the checkpoint was checked")

    monkeypatch.setattr(ilkd, "load_teacher_model", no_teacher)
    with pytest.raises(StageError, match=r"another config \(ilkd\.optimizer\.lr: 0\.001 -> 0\.0005; "):
        run(make_cfg(*STEPS, "ckpt_path=last", "ilkd.optimizer.lr=5e-4", root=root))
    assert tree_bytes(ckpts) == before  # nothing written or removed
    monkeypatch.setattr(ilkd, "load_teacher_model", real_load)
    resumed = run(make_cfg(*STEPS, "ckpt_path=last", "ilkd.tokens=512", root=root))
    assert resumed["steps"] == 8 and len(resumed["loss_history"]) == 8


def test_the_guard_records_the_identity_and_refuses_another_when_a_checkpoint_loads(make_cfg):
    # the check at load time: what DeepSpeed's checkpoint directories (not peeked before the models load) go through
    from zebra.stages.artifacts import resume_identity
    from zebra.stages.errors import StageError
    from zebra.stages.trainer import ResumeGuard

    guard = ResumeGuard(resume_identity(make_cfg(), "kd"))
    checkpoint = {}
    guard.on_save_checkpoint(None, None, checkpoint)
    assert checkpoint[ResumeGuard.KEY] == guard.identity
    guard.on_load_checkpoint(None, None, checkpoint)  # its own: resumes
    guard.on_load_checkpoint(None, None, {})  # one that records nothing: resumes
    other = ResumeGuard(resume_identity(make_cfg("kd.optimizer.lr=1e-3"), "kd"))
    with pytest.raises(StageError, match=r"the checkpoint was written by a run with another config \(kd\.optimizer\.lr: "):
        other.on_load_checkpoint(None, None, checkpoint)


def test_resume_identity_leaves_out_the_budget_and_chains_the_inputs(make_cfg):
    from zebra.stages.artifacts import resume_differences, resume_identity, stage_hash

    base = resume_identity(make_cfg("kd.tokens=1000"), "kd")
    assert resume_identity(make_cfg("kd.tokens=5000", "kd.max_steps=9", "kd.checkpoint_every_n_steps=3"), "kd") == base
    assert "kd.optimizer.lr" in base and not any(k.startswith("kd.tokens") for k in base)
    assert base["ilkd stage (config hash)"] == stage_hash(make_cfg(), "ilkd")
    other = resume_identity(make_cfg("kd.module.temperature=2.0", "ilkd.optimizer.lr=1e-2"), "kd")
    diffs = resume_differences(base, other)
    assert len(diffs) == 2 and diffs[0].startswith("ilkd stage (config hash): ")
    assert diffs[1] == "kd.module.temperature: 1.0 -> 2.0"


# ------------------------------------------------------------------------------------------------ kills
KD = ["stage=kd", "kd.student_init=random", "kd.max_steps=5", "kd.checkpoint_every_n_steps=1", "num_threads=1"]
REPO = Path(__file__).resolve().parents[2]


def export_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def train_in_subprocess(root: Path, data_files: dict, *extra: str) -> subprocess.CompletedProcess:
    """`python train.py` on the tiny KD run, as a user starts it (the same hash seed in every process: the runs
    compared must see the same data order)."""
    args = tiny_overrides(root, data_files, [*KD, *extra, f"hydra.run.dir={root}/hydra"])
    env = {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=600)


KD_DIR = ("tiny", "2mla-uniform", "kd")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_files) -> tuple[dict, dict]:
    """(report, export weights) of the tiny KD run that nothing stops. The embedded tokenizer is converted into
    the session's cache first: the run that converts it draws from the global RNG while converting, so it would
    start from other random weights than the runs after it."""
    from zebra.stages.teacher import load_model_tokenizer

    load_model_tokenizer("smollm2_135m")
    root = tmp_path_factory.mktemp("uninterrupted")
    res = train_in_subprocess(root, data_files)
    assert res.returncode == 0, res.stderr[-3000:]
    kd_dir = root.joinpath(*KD_DIR)
    return json.loads((kd_dir / "report.json").read_text()), export_tensors(kd_dir / "model")


def test_export_killed_midway_resumes_and_finishes(make_cfg, tmp_path, monkeypatch):
    """Killed while writing the KD export (its temporary directory half written), the run resumes with
    ckpt_path=last from a checkpoint already at max_steps: no step is trained again, the held-out KL is measured,
    the export is finished with the trained weights and the temporary directory is gone."""
    from zebra.model import export

    real_save, trained = export.save_hf_model, {}

    def killed_while_saving(model, out_dir, *args, **kwargs):
        trained.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        half = Path(out_dir).parent / f".{Path(out_dir).name}.tmp-killed"
        half.mkdir()
        (half / "model.safetensors").write_bytes(b"\0" * 1000)
        raise KilledForTest("killed during the export")

    monkeypatch.setattr(export, "save_hf_model", killed_while_saving)
    with pytest.raises(KilledForTest):
        run(make_cfg(*KD))
    kd_dir = tmp_path / "artifacts" / "tiny" / "2mla-uniform" / "kd"
    assert (kd_dir / ".model.tmp-killed").is_dir() and not (kd_dir / "model").exists()
    assert not (kd_dir / "report.json").exists()

    monkeypatch.setattr(export, "save_hf_model", real_save)
    resumed = run(make_cfg(*KD, "ckpt_path=last"))
    assert resumed["steps"] == 5 and len(resumed["loss_history"]) == 5
    assert resumed["heldout_kl_after"] is not None and resumed["heldout_kl_before"] is not None
    assert not [p.name for p in kd_dir.iterdir() if p.name.startswith(".")]
    got = export_tensors(kd_dir / "model")
    assert got.keys() <= trained.keys() and got
    assert all(torch.equal(got[k], trained[k]) for k in got)
    assert "->" in (kd_dir / "model" / "README.md").read_text()  # the card's KL line


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_kill_at_a_random_step_resumes_to_the_uninterrupted_result(signame, make_cfg, data_files, tmp_path,
                                                                   uninterrupted):
    """A tiny KD run in its own process gets `signame` at a random step; every earlier export stays byte for byte,
    and the run resumed with ckpt_path=last ends with the uninterrupted run's losses and weights."""
    step = random.randint(1, 3)  # SIGTERM lets the step finish, so it must not be the last one
    why = f"{signame} at step {step}"
    ref, ref_weights = uninterrupted

    root = tmp_path / "killed"
    # an earlier, finished KD of another config (its checkpoints removed: a run of another config would resume from
    # them with ckpt_path=last)
    run(make_cfg(*KD, "kd.max_steps=2", "checkpoint.keep_after_stage=false", root=root))
    kd_dir = root.joinpath(*KD_DIR)
    earlier = tree_bytes(kd_dir / "model")
    earlier_hash = json.loads((kd_dir / "report.json").read_text())["config_hash"]

    res = train_in_subprocess(root, data_files, "+callbacks.kill._target_=tests.stages.crash.SignalAtStep",
                              f"+callbacks.kill.step={step}", f"+callbacks.kill.signal={signame}")
    status = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -9}[signame]
    assert res.returncode == status, (why, res.returncode, res.stderr[-3000:])
    if signame != "SIGKILL":
        hint = [line for line in res.stderr.splitlines() if line.startswith(f"{signame}: training stopped")]
        assert len(hint) == 1 and "resume with ckpt_path=last" in hint[0], (why, res.stderr[-3000:])
    assert tree_bytes(kd_dir / "model") == earlier, why  # the killed run exported nothing
    assert (kd_dir / "checkpoints" / "last.ckpt").exists(), why

    res = train_in_subprocess(root, data_files, "ckpt_path=last")
    assert res.returncode == 0, (why, res.stderr[-3000:])
    resumed = json.loads((kd_dir / "report.json").read_text())
    assert resumed["steps"] == 5, why
    assert resumed["loss_history"] == ref["loss_history"], why
    got = export_tensors(kd_dir / "model")
    assert got.keys() == ref_weights.keys() and all(torch.equal(got[k], ref_weights[k]) for k in got), why
    assert tree_bytes(kd_dir / "previous" / earlier_hash / "model") == earlier, why  # kept, not replaced


# ------------------------------------------------------------------------------------------------ checkpoint safety
class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling calls open(marker, "w"): the file appears


class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_checkpoint_that_runs_code_when_loaded_is_refused(tmp_path):
    from zebra.stages.errors import StageError
    from zebra.stages.trainer import fit

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "payload": RunsCodeWhenUnpickled(marker)}, evil)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(StageError, match=r"evil.ckpt: refused to load.*could run code"):
        fit(trainer, Linear(), None, str(evil))
    assert not marker.exists()


def test_deepspeed_checkpoint_directories_load_only_from_the_runs_own(make_cfg, tmp_path):
    from zebra.stages.artifacts import resume_identity
    from zebra.stages.errors import StageError
    from zebra.stages.trainer import resolve_ckpt_path

    own, other = tmp_path / "run" / "checkpoints", tmp_path / "elsewhere" / "step5.ckpt"
    (own / "step5.ckpt").mkdir(parents=True)
    other.mkdir(parents=True)
    cfg = make_cfg(f"ckpt_path={own / 'step5.ckpt'}")
    assert resolve_ckpt_path(cfg, own, resume_identity(cfg, "kd")) == str(own / "step5.ckpt")
    cfg = make_cfg(f"ckpt_path={other}")
    with pytest.raises(StageError, match="DeepSpeed checkpoint directory outside this run's checkpoints"):
        resolve_ckpt_path(cfg, own, resume_identity(cfg, "kd"))


@pytest.mark.parametrize("value", ["null", "None", "none", "''"])
def test_every_spelling_of_no_checkpoint_starts_fresh(make_cfg, tmp_path, value):
    # the same spellings the Slurm requeue path (zebra.launch.with_resume) reads as "none given"
    from zebra.launch import NO_CHECKPOINT, with_resume
    from zebra.stages.artifacts import resume_identity
    from zebra.stages.trainer import resolve_ckpt_path

    cfg = make_cfg(f"ckpt_path={value}")
    assert resolve_ckpt_path(cfg, tmp_path, resume_identity(cfg, "kd")) is None
    assert value.strip("'") in NO_CHECKPOINT and with_resume([f"ckpt_path={value}"]) == ["ckpt_path=last"]
