"""DeepSpeed ZeRO-2 and ZeRO-3 through the stages, on CPU processes (DeepSpeed's CPU accelerator, gloo).

The same code runs on GPUs; here it is checked without one, in fp32, where it can be
exact: `ilkd` then `kd` on the tiny preset, two processes against one on the same global batch.
- the loss of every step matches the one-process run of the same strategy;
- every parameter that trains has moved from its starting value (a ZeRO-3 trap: a parameter read outside its
  own module's forward -- the Mamba conv weight, the LM head in the chunked KD loss -- is never gathered, or
  never has its gradient reduced, and silently stays as it was);
- ILD's frozen embeddings did not move;
- the export, consolidated from the shards, loads with `from_pretrained` and gives the in-memory model's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import assert_same_loss_curves, finish, start, step_losses, tiny_data, trace_runs

pytestmark = pytest.mark.slow

GLOBAL_BATCH, SEQ, STEPS = 4, 32, 3


def overrides(root: Path, data: Path, strategy: str, batch_size: int) -> list[str]:
    tokens = GLOBAL_BATCH * SEQ * STEPS
    return [
        "stage=pipeline", "stage.order=[ilkd,kd]", "model=tiny", "mix=uniform", "mix.n_mla=2", "logger=none",
        f"strategy={strategy}", f"paths.root={root}", "trainer.enable_progress_bar=false", "num_threads=1",
        f"data.sft.sources=[{{path: '{data}'}}]", "data.sft.heldout_fraction=0.1", "export_check=true",
        "check_weights_moved=true",
        f"ilkd.seq_len={SEQ}", f"ilkd.batch_size={batch_size}", f"ilkd.tokens={tokens}",
        "ilkd.checkpoint_every_n_steps=0", "ilkd.optimizer.lr=1e-3",
        f"kd.seq_len={SEQ}", f"kd.batch_size={batch_size}", f"kd.tokens={tokens}", "kd.checkpoint_every_n_steps=0",
        "kd.optimizer.lr=1e-3",
        "+callbacks.trace._target_=zebra.launch.trainer.StepTrace", f"+callbacks.trace.path={root / 'trace.jsonl'}",
    ]


def ild_starting_students():
    """The students as ILD builds them before training (deterministic: random:0 teacher, SVD init)."""
    from omegaconf import OmegaConf

    from zebra.compose.students import build_student
    from zebra.stages.teacher import load_teacher_model
    from zebra.utils.paths import model_preset_file

    model_cfg = OmegaConf.load(model_preset_file("tiny"))
    teacher = load_teacher_model(model_cfg.teacher, model_cfg.base).model
    mla = OmegaConf.to_container(model_cfg.mla, resolve=True)
    return {kind: build_student(teacher, mla, kind=kind)[0] for kind in ("mla", "mamba")}


def load(path: Path):
    import zebra  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


@pytest.mark.parametrize("strategy", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_two_processes_match_one_and_train_every_weight(tmp_path, strategy):
    data = tiny_data(tmp_path / "data", n=300)
    one, two = tmp_path / "one", tmp_path / "two"
    finish(start(overrides(one, data, strategy, GLOBAL_BATCH)), timeout=600)
    finish(start(overrides(two, data, strategy, GLOBAL_BATCH // 2) + ["trainer=ddp_cpu"], nproc=2), timeout=600)

    assert_same_loss_curves(one, two, ("ilkd", "kd"), STEPS)

    ild = two / "tiny" / "ilkd"
    kd = two / "tiny" / "2mla-uniform" / "kd"
    # ILD: every decoder-layer parameter moved from the SVD / mapping init; embeddings and head are frozen
    for kind, start_model in ild_starting_students().items():
        before, after = start_model.state_dict(), load(ild / kind / "model").state_dict()
        frozen = {"model.embed_tokens.weight", "lm_head.weight"}
        for name, value in before.items():
            if name in frozen:
                assert torch.equal(after[name], value), (kind, name, "a frozen parameter moved")
            elif name.startswith("model.layers."):
                assert not torch.equal(after[name], value), (strategy, kind, name, "did not train")
        report = json.loads((ild / kind / "report.json").read_text())
        assert report["export_check"]["equal"], report["export_check"]

    # KD: every parameter of the hybrid moved from the assembled ILD students
    from zebra.compose.students import assemble_hybrid

    report = json.loads((kd / "report.json").read_text())
    assembled = assemble_hybrid(load(ild / "mla" / "model"), load(ild / "mamba" / "model"), report["mla_layers"])
    before, after = assembled.state_dict(), load(kd / "model").state_dict()
    assert sorted(before) == sorted(after)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{strategy}: KD left these parameters untouched: {unchanged}"
    moved = report["weights_moved"]  # the stage's own check, from the shards, agrees
    assert moved["tensors"] == len(before) - 1 and moved["unchanged"] == [], moved  # tied head counted once
    check = report["export_check"]
    assert check["equal"] and check["max_abs_diff"] == 0.0, check
    assert report["params"] == sum(p.numel() for p in assembled.parameters()), "partitions counted whole"


def test_teacher_in_its_own_zero3_engine_gives_the_replicated_losses(tmp_path):
    """teacher_placement=zero3: the frozen KD teacher is partitioned over the ranks in its own ZeRO-3 inference
    engine (each layer gathered for its forward, its LM head gathered for the loss); the losses are the
    replicated teacher's."""
    data = tiny_data(tmp_path / "data", n=300)
    losses = {}
    for placement in ("replicated", "zero3"):
        root = tmp_path / placement
        finish(start(["stage=kd", "model=tiny", "mix=paper", "kd.student_init=random", "logger=none",
                      "strategy=deepspeed_zero3", "trainer=ddp_cpu", f"paths.root={root}", "num_threads=1",
                      "trainer.enable_progress_bar=false", f"data.sft.sources=[{{path: '{data}'}}]",
                      f"kd.seq_len={SEQ}", "kd.batch_size=2", f"kd.max_steps={STEPS}", "kd.heldout_batches=1",
                      "kd.checkpoint_every_n_steps=0", f"teacher_placement={placement}",
                      "+callbacks.trace._target_=zebra.launch.trainer.StepTrace",
                      f"+callbacks.trace.path={root / 'trace.jsonl'}"], nproc=2), timeout=600)
        losses[placement] = step_losses(trace_runs(root / "trace.jsonl")[0])
        report = json.loads((root / "tiny" / "paper" / "kd" / "report.json").read_text())
        assert report["teacher_placement"] == placement
        assert report["teacher_partitioned"] is (placement == "zero3")
        assert report["heldout_kl_after"] is not None
    assert sorted(losses["zero3"]) == list(range(STEPS))
    for s in losses["replicated"]:
        assert losses["zero3"][s] == pytest.approx(losses["replicated"][s], rel=1e-6)


def test_zero3_run_killed_and_resumed_follows_the_uninterrupted_one(tmp_path):
    """ZeRO-3 checkpoints are directories of per-rank shards (last.ckpt links to one); `ckpt_path=last` resumes
    from them, and the resumed steps' losses are the uninterrupted run's."""
    data = tiny_data(tmp_path / "data", n=300)
    steps = 5

    def launch(root, *extra):
        return finish(start(["stage=kd", "model=tiny", "mix=paper", "kd.student_init=random", "logger=none",
                             "strategy=deepspeed_zero3", "trainer=ddp_cpu", f"paths.root={root}", "num_threads=1",
                             "trainer.enable_progress_bar=false", f"data.sft.sources=[{{path: '{data}'}}]",
                             f"kd.seq_len={SEQ}", "kd.batch_size=2", f"kd.max_steps={steps}", "kd.heldout_batches=0",
                             "kd.checkpoint_every_n_steps=1",
                             "+callbacks.trace._target_=zebra.launch.trainer.StepTrace",
                             f"+callbacks.trace.path={root / 'trace.jsonl'}", *extra], nproc=2),
                      timeout=600, check=not extra or "ckpt_path=last" in extra)

    full, killed = tmp_path / "full", tmp_path / "killed"
    launch(full)
    launch(killed, "+callbacks.kill._target_=tests.stages.crash.StopAtStep", "+callbacks.kill.step=3")
    last = killed / "tiny" / "paper" / "kd" / "checkpoints" / "last.ckpt"
    assert last.is_dir(), "a ZeRO-3 checkpoint is a directory of shards"
    launch(killed, "ckpt_path=last")

    expected = step_losses(trace_runs(full / "trace.jsonl")[0])
    first, resumed = trace_runs(killed / "trace.jsonl")
    assert resumed[0]["global_step"] == 3 and resumed[0]["ckpt_path"].endswith("last.ckpt")
    got = {**step_losses(first), **step_losses(resumed)}
    assert sorted(got) == list(range(steps))
    for s in range(steps):
        assert got[s] == pytest.approx(expected[s], rel=1e-6), (s, got, expected)
    assert (killed / "tiny" / "paper" / "kd" / "model" / "model.safetensors").is_file()


def test_dpo_under_zero3_partitioned_head_and_reference(tmp_path):
    """DPO under ZeRO-3 with every parameter partitioned (persistence threshold 0, as the LM head of any real
    vocabulary is): the loss reads the policy's head directly (registered with the engine) and, with
    `teacher_placement=zero3`, the frozen reference sits in its own ZeRO-3 engine (its head gathered for the
    loss). Same losses as the replicated reference, every policy tensor trained, the export equal to the
    in-memory model."""
    data = tiny_data(tmp_path / "data", n=300)
    losses, reports = {}, {}
    for placement in ("replicated", "zero3"):
        root = tmp_path / placement
        finish(start(["stage=pipeline", "stage.order=[ilkd,kd,dpo]", "model=tiny", "mix=uniform", "mix.n_mla=2",
                      "logger=none", "strategy=deepspeed_zero3", "trainer=ddp_cpu", f"paths.root={root}",
                      "num_threads=1", "trainer.enable_progress_bar=false", f"data.sft.sources=[{{path: '{data}'}}]",
                      f"ilkd.seq_len={SEQ}", "ilkd.max_steps=1", "ilkd.checkpoint_every_n_steps=0",
                      f"kd.seq_len={SEQ}", "kd.max_steps=1", "kd.checkpoint_every_n_steps=0", "kd.heldout_batches=0",
                      f"dpo.max_steps={STEPS}", "dpo.optimizer.lr=1e-4", f"teacher_placement={placement}",
                      "strategy.config.zero_optimization.stage3_param_persistence_threshold=0",
                      "check_weights_moved=true", "export_check=true",
                      "+callbacks.trace._target_=zebra.launch.trainer.StepTrace",
                      f"+callbacks.trace.path={root / 'trace.jsonl'}"], nproc=2), timeout=900)
        losses[placement] = step_losses(trace_runs(root / "trace.jsonl")[-1])
        reports[placement] = json.loads((root / "tiny" / "2mla-uniform" / "dpo" / "report.json").read_text())
    assert reports["zero3"]["reference_placement"] == "zero3"
    assert all(r["policy_created"] == "sharded" for r in reports.values())
    assert sorted(losses["zero3"]) == list(range(STEPS))
    for s in losses["replicated"]:
        assert losses["zero3"][s] == pytest.approx(losses["replicated"][s], rel=1e-6)
    for report in reports.values():
        moved = report["weights_moved"]
        assert moved["unchanged"] == [] and moved["compared"] == "fp32 master weights", moved
        assert report["export_check"]["equal"], report["export_check"]
