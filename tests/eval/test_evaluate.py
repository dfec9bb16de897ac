"""zebra.eval.evaluate on a fake training run of a tiny teacher: report fields, plots, and bad input."""

import json
import subprocess
import sys

import pytest
import torch

from zebra.eval.models import NotAModelError, TokenizerMismatchError
from zebra.eval.evaluate import run_cli as main

SMALL = ["--seq-len", "64", "--max-tokens", "192", "--sft-batches", "1", "--limit", "6", "--batch-size", "16"]


@pytest.fixture(scope="module")
def run_report(tiny_run, tmp_path_factory):
    """`python -m zebra.eval.evaluate --artifacts <run>` (as a function call)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval")
    report = main(["--artifacts", str(tiny_run), "--out", str(out), *SMALL])
    return report, out


def test_report_lists_teacher_assembled_and_final(run_report, tiny_teacher_dir):
    report, out = run_report
    assert report["teacher"] == str(tiny_teacher_dir)  # read from the kd stage's report
    assert list(report["models"]) == ["teacher", "assembled", "kd", "dpo"]
    assert report["final"] == "dpo"
    models = report["models"]
    for name, row in models.items():
        for key in ("heldout_kl", "perplexity", "params", "kv_fraction", "cache_bytes_per_token"):
            assert row[key] is not None, (name, key)
        assert set(row["heldout"]) == {"text", "sft"}
        assert row["lm_eval"]["tasks"]["zebra_mc"]["n"] == 6
        assert {"acc", "acc_norm"} <= set(row["lm_eval"]["tasks"]["zebra_mc"])
    assert models["teacher"]["heldout_kl"] == 0.0 and models["teacher"]["kv_fraction"] == 1.0
    # tiny run: MLA at [0, 2] of 4 layers, r_kv + d_rope = 24 of 2 * 2 * 16 = 64 values per layer
    for name in ("assembled", "kd", "dpo"):
        assert models[name]["kv_fraction"] == pytest.approx(2 * 24 / (4 * 64))
        assert models[name]["layer_types"] == "AMAM" and models[name]["mla_layers"] == [0, 2]
        assert models[name]["heldout_kl"] > 0
        assert models[name]["params"] > models["teacher"]["params"] * 0.9
    # the three hybrids are different models
    kls = {models[n]["heldout"]["text"]["kl_to_teacher"] for n in ("assembled", "kd", "dpo")}
    assert len(kls) == 3
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"]["dpo"]["perplexity"] == pytest.approx(models["dpo"]["perplexity"])
    md = (out / "report.md").read_text()
    assert "| dpo (final) | dpo |" in md and "zebra_mc acc_norm" in md and "KL to teacher (sft)" in md


def test_assembled_hybrid_is_rebuilt_from_the_ild_exports(run_report, tiny_run, tiny_teacher_dir, smol_tokenizer):
    from transformers import LlamaForCausalLM

    from zebra.eval.heldout import text_rows
    from zebra.eval.metrics import score_batches
    from zebra.eval.models import build_assembled

    report, _ = run_report
    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    hybrid = build_assembled(tiny_run, [0, 2]).model
    rows, _ = text_rows(smol_tokenizer, None, 64, 192)
    direct = score_batches(hybrid, teacher, rows)
    assert direct["kl_to_teacher"] == pytest.approx(report["models"]["assembled"]["heldout"]["text"]["kl_to_teacher"],
                                                    rel=1e-6)


def test_plots_are_written(run_report):
    report, out = run_report
    for name in ("loss_curves.png", "kv_cache.png", "smart/sensitivity.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 5000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report["plots"]) >= {"loss_curves", "kv_cache", "smart"}


def test_not_a_model_path(tmp_path, tiny_teacher_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"")
    with pytest.raises(NotAModelError, match="no config.json"):
        main(["--teacher", str(tiny_teacher_dir), "--models", str(tmp_path / "empty"), "--tasks", "none"])
    with pytest.raises(NotAModelError, match="does not exist"):
        main(["--teacher", str(tiny_teacher_dir), "--models", str(tmp_path / "missing"), "--tasks", "none"])


def test_not_a_model_path_from_the_command_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "zebra.eval.evaluate", "--models", str(tmp_path), "--tasks", "none"],
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert res.returncode == 2
    assert "is not a model directory: it has no config.json" in res.stderr


def test_tokenizer_mismatch(tmp_path, tiny_run, tiny_teacher_dir, smol_tokenizer):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other_tok"
    shutil.copytree(tiny_run / "2mla" / "kd" / "model", other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_special_tokens({"additional_special_tokens": ["<|zebra|>"]})
    tok.save_pretrained(other)
    with pytest.raises(TokenizerMismatchError, match="tokenizer of .* differs from the teacher's"):
        main(["--teacher", str(tiny_teacher_dir), "--models", str(other), "--tasks", "none", "--heldout", "text",
              "--seq-len", "32", "--max-tokens", "64", "--no-plots", "--out", str(tmp_path / "eval")])


def test_unknown_task_fails_before_loading(tiny_teacher_dir, monkeypatch):
    from zebra.eval import models
    from zebra.eval.harness import UnknownTaskError

    def boom(*a, **k):
        raise AssertionError("the teacher was loaded before the task names were checked")

    monkeypatch.setattr("zebra.eval.evaluate.load_eval_teacher", boom)
    with pytest.raises(UnknownTaskError, match="no_such_task"):
        main(["--teacher", str(tiny_teacher_dir), "--tasks", "zebra_mc,no_such_task"])
    assert models.load_eval_teacher is not boom
