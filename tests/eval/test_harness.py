"""lm-eval over model instances (HFLM's own constructor) on the shipped offline task zebra_mc."""

import pytest
import torch

from zebra.eval import harness
from zebra.eval.harness import UnknownTaskError, expand_task_names, resolve_tasks, run_lm_eval


@pytest.fixture
def hflm_spy(monkeypatch):
    """Records what HFLM was constructed with, running its real constructor."""
    from lm_eval.models.huggingface import HFLM

    seen = []
    original = HFLM.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("pretrained", args[0] if args else None))
        original(self, *args, **kwargs)

    monkeypatch.setattr(HFLM, "__init__", spy)
    return seen


def test_local_task_on_tiny_hybrid_instance(tiny_run, smol_tokenizer, hflm_spy):
    import zebra  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_run / "2mla" / "kd" / "model").eval()
    out = run_lm_eval(model, smol_tokenizer, ["zebra_mc"], batch_size=16)
    assert hflm_spy == [model]  # the instance itself went through HFLM's constructor
    row = out["tasks"]["zebra_mc"]
    assert row["n"] == 42 and row["headline"] == "acc"
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= row[metric] <= 1.0
        assert row[f"{metric}_stderr"] > 0
    assert not model.training


@pytest.mark.slow
def test_local_task_on_smollm2_teacher(hflm_spy, smollm2_teacher):
    teacher = smollm2_teacher
    out = run_lm_eval(teacher.model, teacher.tokenizer, "zebra_mc", batch_size=16)
    row = out["tasks"]["zebra_mc"]
    assert hflm_spy == [teacher.model]
    assert row["n"] == 42
    # a pre-trained model answers these easy questions far above chance (25%), even at 4 bits
    assert row["acc"] > 0.4 and row["acc_norm"] > 0.4, row


def test_unknown_task_lists_what_is_available():
    with pytest.raises(UnknownTaskError) as err:
        resolve_tasks(["zebra_mc", "arc_eazy"])
    msg = str(err.value)
    assert "arc_eazy" in msg and "zebra_mc" in msg and "arc_challenge" in msg and "paper" in msg


def test_task_names_expand():
    assert expand_task_names("zebra_mc, paper") == ["zebra_mc"] + list(harness.PAPER_TASKS)
    assert expand_task_names("none") == [] and expand_task_names(None) == []
    names, tm = resolve_tasks("local")
    assert names == ["zebra_mc"] and "zebra_mc" in tm.all_tasks


def test_shipped_questions_are_well_formed():
    from zebra.eval.tasks.zebra_mc_utils import read_docs

    docs = read_docs()
    assert len(docs) >= 40
    assert len({d["question"] for d in docs}) == len(docs)
    counts = [sum(d["answer"] == k for d in docs) for k in range(4)]
    assert min(counts) >= 8  # right answers spread over the four positions
    for d in docs:
        assert len(set(d["choices"])) == 4


def test_lm_eval_restores_training_mode(tiny_run, smol_tokenizer):
    import zebra  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_run / "2mla" / "kd" / "model").train()
    out = run_lm_eval(model, smol_tokenizer, ["zebra_mc"], batch_size=16, limit=4)
    assert model.training and out["tasks"]["zebra_mc"]["n"] == 4
    assert out["limit"] == 4 and torch.is_grad_enabled()


def test_hub_task_offline_fails_with_a_clear_error(tiny_run, smol_tokenizer):
    import zebra  # noqa: F401
    from transformers import AutoModelForCausalLM

    from zebra.eval.harness import TaskUnavailableError

    model = AutoModelForCausalLM.from_pretrained(tiny_run / "2mla" / "kd" / "model").eval()
    with pytest.raises(TaskUnavailableError, match="hub"):
        run_lm_eval(model, smol_tokenizer, ["arc_easy"], limit=2)


def test_no_task_needs_no_lm_eval(monkeypatch):
    """Held-out metrics alone (tasks empty or `none`) run where lm-eval is not installed (the GPU image)."""
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    assert resolve_tasks([]) == ([], None)
    assert resolve_tasks("none") == ([], None)
    with pytest.raises(ImportError):
        harness.task_manager.__wrapped__(False)
