"""One spec names a teacher and its tokenizer: any GGUF path (cached by content), a directory with one GGUF, a
tokenizer directory, `random:`; the errors for specs that cannot work; the one tokenizer-compatibility rule."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import normalizers

from zebra.compose import teacher as T
from zebra.compose.teacher import TeacherLoadError, load_teacher, load_tokenizer, tokenizer_differences
from zebra.data.tokenizers import tokenizer_fingerprint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def renamed_gguf(tmp_path_factory):
    """The embedded GGUF copied under another name, in a directory whose name has a space."""
    path = tmp_path_factory.mktemp("gguf") / "my teachers" / "renamed-model.gguf"
    path.parent.mkdir()
    shutil.copyfile(T.embedded_gguf_path(), path)
    return path


def test_any_gguf_path_is_base_and_tokenizer(renamed_gguf, smollm2_teacher, gguf_conversions):
    before = len(gguf_conversions)
    tok = load_tokenizer(str(renamed_gguf))
    assert tok.name_or_path == str(renamed_gguf)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(smollm2_teacher.tokenizer)
    assert tokenizer_differences(tok, smollm2_teacher.tokenizer) == []
    teacher = load_teacher(str(renamed_gguf))
    # the same bytes: the embedded file's converted entry, no second conversion
    assert teacher.path == smollm2_teacher.path and not teacher.converted and len(gguf_conversions) == before
    assert teacher.quantisation == T.GGUF_QUANTISATION and smollm2_teacher.quantisation == T.EMBEDDED_QUANTISATION
    assert teacher.tokenizer.eos_token == "<|im_end|>" and teacher.tokenizer.chat_template
    for (n1, p1), (n2, p2) in zip(teacher.model.state_dict().items(), smollm2_teacher.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # a directory holding exactly one GGUF names it too
    assert load_tokenizer(str(renamed_gguf.parent)).get_vocab() == tok.get_vocab()


def test_cache_entry_is_keyed_by_content(tmp_path):
    a, b, a_copy = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "elsewhere" / "a.gguf"
    a.write_bytes(b"GGUF" + bytes(range(200)))
    b.write_bytes(b"GGUF" + bytes(range(1, 201)))  # same size, other bytes
    a_copy.parent.mkdir()
    shutil.copyfile(a, a_copy)
    da, db, dc = T.gguf_digest(a), T.gguf_digest(b), T.gguf_digest(a_copy)
    assert da == dc != db
    assert T._gguf_cache_dir(da) == T._gguf_cache_dir(dc) != T._gguf_cache_dir(db)
    # an edited file is hashed again (its size or mtime changed), not served from the remembered digest
    a.write_bytes(b"GGUF" + bytes(range(2, 202)) + b"x")
    assert T.gguf_digest(a) not in (da, db)


def test_bad_specs_name_the_spec(tmp_path):
    for bad in (str(tmp_path / "missing.gguf"), str(tmp_path / "nope"), "./no/such/tokenizer"):
        with pytest.raises(TeacherLoadError, match="does not exist") as err:
            load_tokenizer(bad)
        assert bad in str(err.value)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    for load in (load_tokenizer, load_teacher):
        with pytest.raises(TeacherLoadError, match="broken.gguf cannot be read"):
            load(str(broken))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="holds no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(TeacherLoadError, match="random model, not a tokenizer"):
        load_tokenizer("random:0")
    with pytest.raises(TeacherLoadError, match="model.base block"):
        load_teacher("random:3")
    with pytest.raises(TeacherLoadError, match="integer"):
        load_teacher("random:x")


def test_tokenizer_directory_and_random_teacher(tmp_path, smollm2_teacher):
    smollm2_teacher.tokenizer.save_pretrained(tmp_path / "tok")  # tokenizer files only, no model config
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tokenizer_differences(tok, smollm2_teacher.tokenizer) == []
    base = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    t = load_teacher("random:5", base=base, tokenizer=str(tmp_path / "tok"))
    again = load_teacher("random:5", base=base)
    assert t.tokenizer.get_vocab() == tok.get_vocab() and again.tokenizer is None and t.path is None
    assert t.quantisation == "none (random init, seed 5)"
    assert torch.equal(t.model.lm_head.weight, again.model.lm_head.weight)  # the seed decides the weights
    assert not torch.equal(t.model.lm_head.weight, load_teacher("random:6", base=base).model.lm_head.weight)


def test_tokenizer_differences_rule(smollm2_teacher):
    tok = smollm2_teacher.tokenizer
    assert tokenizer_differences(tok, tok) == []
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None  # filled with eos at load time: no token id changes
    assert tokenizer_differences(tok, no_pad) == []
    other_pad = copy.deepcopy(tok)
    other_pad.pad_token = "<|endoftext|>"
    assert any("pad_token" in d for d in tokenizer_differences(tok, other_pad))
    other_eos = copy.deepcopy(tok)
    other_eos.eos_token = "<|im_start|>"
    assert any("eos_token" in d for d in tokenizer_differences(tok, other_eos))
    lower = copy.deepcopy(tok)  # the same vocabulary, other ids for the same text
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert lower.get_vocab() == tok.get_vocab()
    assert any("encodes to" in d for d in tokenizer_differences(tok, lower))


@pytest.mark.slow
def test_train_with_a_gguf_path_as_teacher(renamed_gguf, smollm2_teacher, tmp_path):
    """`python train.py model.teacher=<any .gguf>`: the ILD stage loads the base and the tokenizer from it (one
    training step, no export), from the session's converted entry (the subprocess inherits $ZEBRA_CACHE)."""
    entries = sorted(p.name for p in (Path(os.environ["ZEBRA_CACHE"]) / "teachers").iterdir())
    cmd = [sys.executable, str(REPO / "train.py"), "stage=ilkd", f"model.teacher={renamed_gguf}",
           "ilkd.students=mla", "ilkd.max_steps=1", "ilkd.tokens=null", "ilkd.seq_len=32",
           "ilkd.checkpoint_every_n_steps=0", "checkpoint.keep_after_stage=false", "export=false", "logger=none",
           "trainer.enable_progress_bar=false", "num_threads=2", f"paths.root={tmp_path / 'artifacts'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "artifacts" / "smollm2_135m" / "ilkd" / "report.json").read_text())
    shown = {k: report[k] for k in ("teacher", "teacher_quantisation", "steps", "tokens_seen", "loss_first")}
    print(f"\nilkd with model.teacher={renamed_gguf}: {json.dumps(shown)}")
    assert report["teacher"] == str(renamed_gguf)
    assert report["teacher_quantisation"] == T.GGUF_QUANTISATION
    assert report["steps"] == 1 and report["tokens_seen"] == 32 and report["loss_first"] > 0
    assert sorted(p.name for p in (Path(os.environ["ZEBRA_CACHE"]) / "teachers").iterdir()) == entries
