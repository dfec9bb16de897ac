"""Bad input fails early with a message naming the problem, and never leaves a partial model/ export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from zebra.stages.errors import MissingArtifactError, NonFiniteLossError, StageError, TokenizerMismatchError
from zebra.stages.run import run


def no_exports(root: Path) -> bool:
    return not list(root.rglob("model.safetensors")) and not list(root.rglob(".tmp-*"))


@pytest.fixture(scope="module")
def ild_root(tmp_path_factory, data_files):
    """A tiny ILD run whose exports the kd tests start from (copied per test)."""
    from stage_helpers import compose_cfg, tiny_overrides

    root = tmp_path_factory.mktemp("ild")
    run(compose_cfg(tiny_overrides(root, data_files, ["stage=ilkd", "ilkd.tokens=64"])))
    return root


def test_missing_data_file(make_cfg, tmp_path):
    missing = tmp_path / "nope" / "sft.jsonl"
    with pytest.raises((FileNotFoundError, ValueError, OSError)) as err:
        run(make_cfg("stage=ilkd", f"data.sft.sources=[{{path: '{missing}'}}]"))
    assert str(missing) in str(err.value)
    assert no_exports(tmp_path)


def test_empty_dataset(make_cfg, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError) as err:
        run(make_cfg("stage=ilkd", f"data.sft.sources=[{{path: '{empty}'}}]"))
    assert "empty.jsonl" in str(err.value)
    assert no_exports(tmp_path)


def test_too_short_dataset(make_cfg, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises(ValueError) as err:
        run(make_cfg("stage=ilkd", f"data.sft.sources=[{{path: '{short}'}}]", "data.sft.heldout_fraction=0",
                     "data.sft.ild_fraction=1.0", "ilkd.seq_len=512", "ilkd.batch_size=4"))
    assert "batch" in str(err.value) or "documents" in str(err.value)
    assert no_exports(tmp_path)


def test_missing_previous_stage(make_cfg, tmp_path):
    with pytest.raises(MissingArtifactError, match="stage=ilkd"):
        run(make_cfg("stage=kd"))
    with pytest.raises(MissingArtifactError, match="stage=kd"):
        run(make_cfg("stage=dpo"))


def test_mismatched_tokenizers_stop_kd_before_training(make_cfg, tmp_path, ild_root):
    from transformers import LlamaForCausalLM

    from zebra.stages.teacher import llama_config_from_base, load_model_tokenizer

    root = tmp_path / "art"
    shutil.copytree(ild_root, root)
    # a Llama teacher directory whose tokenizer has one extra special token
    teacher_dir = tmp_path / "other_teacher"
    cfg0 = make_cfg(root=root)
    tok = load_model_tokenizer(cfg0.model.tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|tool_call|>"]})
    base = OmegaConf.to_container(cfg0.model.base, resolve=True)
    base["vocab_size"] = len(tok)
    LlamaForCausalLM(llama_config_from_base(base)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    with pytest.raises(TokenizerMismatchError, match="tokenizers differ") as err:
        run(make_cfg("stage=kd", f"model.kd_teacher={teacher_dir}", root=root))
    assert str(teacher_dir) in str(err.value)
    assert not (root / "tiny" / "2mla-uniform" / "kd").exists() or no_exports(root / "tiny" / "2mla-uniform")


def test_non_finite_loss_stops_without_export(make_cfg, tmp_path, monkeypatch, ild_root):
    from zebra.stages.kd import KDModule

    root = tmp_path / "art"
    shutil.copytree(ild_root, root)
    real = KDModule.kd_loss

    def poisoned(self, batch):
        loss, stats = real(self, batch)
        return (loss * float("nan") if self.global_step == 2 else loss), stats

    monkeypatch.setattr(KDModule, "kd_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        run(make_cfg("stage=kd", root=root))
    assert not (root / "tiny" / "2mla-uniform" / "kd" / "model").exists()
    assert not (root / "tiny" / "2mla-uniform" / "kd" / "report.json").exists()


def test_teacher_placement_is_checked_before_any_model_loads(make_cfg, tmp_path, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded before the placement was checked")

    monkeypatch.setattr("zebra.stages.ilkd.load_teacher_model", no_teacher)
    with pytest.raises(StageError, match="DeepSpeed strategy"):
        run(make_cfg("stage=ilkd", "teacher_placement=zero3"))  # the default strategy is not DeepSpeed
    with pytest.raises(StageError, match="'replicated' or 'zero3'"):
        run(make_cfg("stage=ilkd", "teacher_placement=everywhere"))
    assert no_exports(tmp_path)
