"""The stage graph (zebra.stages.artifacts): hashes that follow what each stage depends on, the finish / is_done /
load protocol, and the step budget every training stage computes before its Trainer exists."""

from __future__ import annotations

import json

import pytest
import torch

from stage_helpers import compose_cfg
from zebra.stages import artifacts, budget
from zebra.stages.errors import MissingArtifactError, StageError


def hashes(*overrides: str) -> dict[str, str]:
    cfg = compose_cfg(["mix=uniform", "mix.n_mla=2", "paths.root=/r", *overrides])
    return {s: artifacts.stage_hash(cfg, s) for s in artifacts.STAGES}


def test_hashes_follow_the_graph():
    base = hashes()
    assert hashes("ilkd.students=mla") == base  # which students run together does not change either result
    assert hashes("num_threads=3", "ckpt_path=last", "force=true", "check_weights_moved=true") == base
    changed = {s for s, h in hashes("kd.module.temperature=2.0").items() if h != base[s]}
    assert changed == {"kd", "dpo", "teacher_cache"}  # kd's own setting, dpo through its input, the cached log-probs
    ild_free = {"teacher_cache", "teacher_data"}  # the teacher's top-k / samples: no student in them
    assert {s for s, h in hashes("ilkd.optimizer.lr=1e-3").items() if h != base[s]} == set(artifacts.STAGES) - ild_free
    assert {s for s, h in hashes("teacher_cache.top_k=16").items() if h != base[s]} == {"teacher_cache"}
    assert {s for s, h in hashes("teacher_cache.top_k=16", "kd.teacher_source=cache").items()
            if h != base[s]} == {"teacher_cache", "kd", "dpo"}  # KD from the cache reads it
    assert hashes("teacher_cache.batch_size=3")["teacher_cache"] == base["teacher_cache"]
    assert {s for s, h in hashes("dpo.module.beta=0.5").items() if h != base[s]} == {"dpo"}
    # a uniform mix does not read SMART's output, a smart mix does
    assert hashes("smart.tokens=5")["kd"] == base["kd"]
    smart = hashes("mix=smart", "mix.n_mla=2")
    assert hashes("mix=smart", "mix.n_mla=2", "smart.tokens=5")["kd"] != smart["kd"]


def test_finish_is_done_and_load(tmp_path):
    cfg = compose_cfg(["model=tiny", "mix=uniform", "mix.n_mla=2", f"paths.root={tmp_path}"])
    with pytest.raises(MissingArtifactError, match=r"stage=smart") as err:
        artifacts.load(cfg, "smart", "output")
    assert str(tmp_path / "tiny" / "smart" / "sensitivity.json") in str(err.value)
    with pytest.raises(MissingArtifactError, match="ilkd.students=both or mamba"):
        artifacts.load(cfg, "ilkd", "config", part="mamba")
    assert artifacts.load(cfg, "smart", "report") == {} and not artifacts.is_done(cfg, "smart")

    report = {"config_hash": artifacts.stage_hash(cfg, "smart"), "scores": [1.0]}
    ckpts = artifacts.checkpoint_dir(cfg, "smart")
    ckpts.mkdir(parents=True)
    out = artifacts.finish(cfg, "smart", None, report, checkpoints=ckpts,
                           outputs=lambda d: (d / "sensitivity.json").write_text(json.dumps({"scores": [1.0]})))
    d = tmp_path / "tiny" / "smart"
    assert out is report and sorted(p.name for p in d.iterdir()) == ["checkpoints", "report.json",
                                                                      "sensitivity.json"]  # kept by default
    assert artifacts.is_done(cfg, "smart") and artifacts.load(cfg, "smart", "report") == report
    assert artifacts.load(cfg, "smart", "output") == d / "sensitivity.json"
    assert not artifacts.is_done(compose_cfg(["model=tiny", "mix=uniform", "mix.n_mla=2", f"paths.root={tmp_path}",
                                              "smart.tokens=5"]), "smart")  # another config's result
    assert artifacts.checkpoint_dir(cfg, "ilkd", ("mla",)).name == "checkpoints-mla"
    assert artifacts.checkpoint_dir(cfg, "ilkd", ("mla", "mamba")).name == "checkpoints"


def test_holds_run(tmp_path):
    assert not artifacts.holds_run(tmp_path)
    (tmp_path / "4mla-uniform" / "dpo").mkdir(parents=True)
    assert artifacts.holds_run(tmp_path)
    assert artifacts.layout(tmp_path, "dpo", "4mla-uniform") == tmp_path / "4mla-uniform" / "dpo"


def test_budget_rule_is_the_same_for_tokens_and_pairs():
    cfg = compose_cfg(["trainer.devices=2"])
    assert budget.world_size(cfg) == 2 and budget.world_size(compose_cfg(["trainer.devices=[0,1,2]"])) == 3
    assert budget.world_size(compose_cfg(["trainer.devices=auto"])) == 1  # the CPU trainer
    for stage, amount in (("kd", "tokens"), ("dpo", "pairs")):
        sc = compose_cfg([f"{stage}.{amount}=1000", f"{stage}.epochs=3"])[stage]
        assert budget.fixed_steps(sc, sc[amount], 300) == 4  # the amount wins over epochs, rounded up
        sc = compose_cfg([f"{stage}.{amount}=1000", f"{stage}.max_steps=7"])[stage]
        assert budget.fixed_steps(sc, sc[amount], 300) == 7  # max_steps wins over both
        sc = compose_cfg([f"{stage}.{amount}=null", f"{stage}.epochs=2", f"{stage}.accumulate_grad_batches=3"])[stage]
        assert budget.fixed_steps(sc, sc[amount], 300) is None and budget.epoch_steps(sc, 10) == 7
        sc = compose_cfg([f"{stage}.{amount}=null"])[stage]
        with pytest.raises(StageError, match="max_steps"):
            budget.fixed_steps(sc, sc[amount], 300)


def test_trainer_is_built_with_the_budget(tmp_path):
    from zebra.stages.trainer import build_trainer

    cfg = compose_cfg(["model=tiny", "logger=none", f"paths.root={tmp_path}", "kd.accumulate_grad_batches=2"])
    trainer, resume_from = build_trainer(cfg, "kd", cfg.kd, max_steps=5, world=1)
    assert resume_from is None  # ckpt_path unset: a fresh start
    assert trainer.max_steps == 5 and trainer.accumulate_grad_batches == 2 and trainer.gradient_clip_val == 1.0
    with pytest.raises(StageError, match="planned for 2 processes"):
        build_trainer(cfg, "kd", cfg.kd, max_steps=5, world=2)


# ------------------------------------------------------------------------------------------------ no result lost
def tiny_model(seed: int):
    from zebra.model import ZebraConfig, ZebraForCausalLM

    torch.manual_seed(seed)
    return ZebraForCausalLM(ZebraConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, hybrid_layer_types=["mla", "mamba"],
                                        mamba_chunk_size=16)).eval()


CARD = dict(title="t", stage="kd", base="b", teacher="t", teacher_quantisation="none", data="d", tokens=0)


def kd_cfg(root, *extra):
    return compose_cfg(["model=tiny", "mix=uniform", "mix.n_mla=2", f"paths.root={root}", *extra])


def finish_kd(cfg, seed: int, trainer=None):
    report = {"config_hash": artifacts.stage_hash(cfg, "kd"), "seed": seed}
    return artifacts.finish(cfg, "kd", trainer, report, model=tiny_model(seed), card=CARD)


def tree_bytes(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_finished_result_of_another_config_is_kept(tmp_path):
    a, b = kd_cfg(tmp_path), kd_cfg(tmp_path, "kd.module.temperature=2.0")
    d = artifacts.stage_dir(a, "kd")
    finish_kd(a, 1)
    first = tree_bytes(d / "model")
    hash_a = artifacts.stage_hash(a, "kd")
    finish_kd(b, 2)
    assert artifacts.is_done(b, "kd") and not artifacts.is_done(a, "kd")
    kept = d / "previous" / hash_a
    assert tree_bytes(kept / "model") == first and tree_bytes(d / "model") != first
    assert json.loads((kept / "report.json").read_text()) == {"config_hash": hash_a, "seed": 1, "export_check": None}
    finish_kd(b, 3)  # the same config again: replaced in place, nothing more kept
    assert sorted(p.name for p in (d / "previous").iterdir()) == [hash_a]
    assert artifacts.load(b, "kd", "report")["seed"] == 3
    finish_kd(kd_cfg(tmp_path, "kd.module.temperature=3.0", "force=true"), 4)  # force: replaced, not kept
    assert sorted(p.name for p in (d / "previous").iterdir()) == [hash_a]
    assert artifacts.load(a, "kd", "report")["seed"] == 4


def test_file_outputs_of_another_config_are_kept(tmp_path):
    def outputs(text):
        return lambda d: ((d / "sensitivity.json").write_text(text), (d / "sensitivity.png").write_text(text))

    a, b = kd_cfg(tmp_path), kd_cfg(tmp_path, "smart.tokens=5")
    for cfg, text in ((a, "a"), (b, "b")):
        artifacts.finish(cfg, "smart", None, {"config_hash": artifacts.stage_hash(cfg, "smart")}, outputs=outputs(text))
    d = artifacts.stage_dir(a, "smart")
    kept = d / "previous" / artifacts.stage_hash(a, "smart")
    assert sorted(p.name for p in kept.iterdir()) == ["report.json", "sensitivity.json", "sensitivity.png"]
    assert (kept / "sensitivity.png").read_text() == "a" and (d / "sensitivity.png").read_text() == "b"
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_a_run_that_trained_no_step_is_refused_and_changes_nothing(tmp_path):
    from types import SimpleNamespace

    cfg = kd_cfg(tmp_path)
    finish_kd(cfg, 1)
    d = artifacts.stage_dir(cfg, "kd")
    before = tree_bytes(d)
    with pytest.raises(StageError, match="trained 0 optimiser steps"):
        finish_kd(kd_cfg(tmp_path, "kd.max_steps=0"), 2, trainer=SimpleNamespace(global_step=0, global_rank=0))
    assert tree_bytes(d) == before


def test_a_killed_writes_leftovers_are_removed_by_the_next_finish(tmp_path):
    cfg = kd_cfg(tmp_path)
    d = artifacts.stage_dir(cfg, "kd")
    (d / ".model.tmp-dead" / "sub").mkdir(parents=True)
    (d / ".model.tmp-dead" / "model.safetensors").write_bytes(b"\0" * 100)
    (d / ".model.old-123").mkdir()
    (d / ".report.json.tmp-abc").write_text("{")
    finish_kd(cfg, 1)
    assert sorted(p.name for p in d.iterdir()) == ["model", "report.json"]


@pytest.mark.parametrize("mask,dirs,files_", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_exports_and_reports_are_as_readable_as_the_umask_allows(tmp_path, mask, dirs, files_):
    import os
    import stat

    old = os.umask(mask)
    try:
        cfg = kd_cfg(tmp_path)
        finish_kd(cfg, 1)
    finally:
        os.umask(old)
    d = artifacts.stage_dir(cfg, "kd")
    modes = {str(p.relative_to(d)): stat.S_IMODE(p.stat().st_mode) for p in [d / "model", *d.rglob("*")]}
    assert {k for k, m in modes.items() if m != (dirs if (d / k).is_dir() else files_)} == set(), modes
    assert modes["report.json"] == files_ and modes["model/model.safetensors"] == files_
