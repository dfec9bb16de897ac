"""zebra.stages.validate: the whole run checked from configs, file headers and small files, before anything loads."""

from __future__ import annotations

import json

import pytest

from zebra.compose.teacher import TeacherLoadError, UnsupportedTeacherError
from zebra.errors import ConfigError, DataError, ZebraInputError
from zebra.stages.errors import MissingArtifactError
from zebra.stages.validate import check_reference, check_spec, validate


@pytest.fixture
def nothing_loads(monkeypatch):
    """Validation must not load a teacher, convert a GGUF or build a data module."""
    def refuse(*args, **kwargs):
        raise AssertionError("validation loaded something")

    for target in ("zebra.compose.teacher.load_teacher", "zebra.compose.teacher.convert_gguf",
                   "zebra.compose.teacher.load_tokenizer", "zebra.data.sft.TokenMixtureDataModule.setup"):
        monkeypatch.setattr(target, refuse)


def test_a_good_pipeline_passes_and_names_its_stages(make_cfg, nothing_loads):
    assert validate(make_cfg("stage=pipeline")) == ["ilkd", "smart", "kd", "dpo"]
    assert validate(make_cfg("stage=describe")) == []


@pytest.mark.parametrize("override, message", [
    ("ilkd.seq_len=0", "ilkd.seq_len must be a positive integer, got 0"),
    ("smart.batch_size=-2", "smart.batch_size must be a positive integer, got -2"),
    ("kd.accumulate_grad_batches=1.5", "kd.accumulate_grad_batches must be a positive integer, got 1.5"),
    ("dpo.pairs=0", "dpo.pairs must be a positive integer or null, got 0"),
    ("kd.epochs=-0.5", "kd.epochs must be a positive number or null, got -0.5"),
    ("dpo.optimizer.lr=-1e-5", "dpo.optimizer.lr must be a positive number, got -1e-05"),
    ("kd.heldout_batches=-1", "kd.heldout_batches must be a non-negative integer or null, got -1"),
    ("dpo.max_prompt_length=64", "dpo.max_prompt_length (64) must be less than dpo.max_length (64)"),
    ("smart.n_mla=[0,2]", "smart.n_mla has sizes [0]"),
    ("mix.n_mla=5", "mix.n_mla=5 is larger than the number of layers (4) of tiny"),
    ("mix=explicit", "mix=explicit needs mix.mla_layers"),
    ("kd.student_init=copy", "kd.student_init must be 'ilkd' or 'random', got 'copy'"),
])
def test_bad_values_fail_with_their_key(make_cfg, nothing_loads, override, message):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("stage=pipeline", override))
    assert str(err.value).startswith(message), str(err.value)


def test_budget_needs_one_amount(make_cfg, nothing_loads):
    with pytest.raises(ConfigError, match="ilkd has no budget"):
        validate(make_cfg("stage=ilkd", "ilkd.tokens=null"))
    validate(make_cfg("stage=ilkd", "ilkd.tokens=null", "ilkd.epochs=0.5"))  # a fraction of a pass is a budget


def test_explicit_layers_are_checked_against_the_model(make_cfg, nothing_loads):
    validate(make_cfg("stage=pipeline", "mix=explicit", "mix.mla_layers=[0,3]"))
    with pytest.raises(ConfigError, match=r"mix.mla_layers \[4\] out of range for a 4-layer model"):
        validate(make_cfg("stage=pipeline", "mix=explicit", "mix.mla_layers=[0,4]"))


def test_a_single_stage_needs_the_exports_it_reads(make_cfg, nothing_loads):
    with pytest.raises(MissingArtifactError, match="stage=ilkd"):
        validate(make_cfg("stage=kd"))
    # a randomly initialised KD student (throughput runs) reads no ILD export
    assert validate(make_cfg("stage=kd", "kd.student_init=random")) == ["kd"]


def test_data_sources_are_read_and_their_fields_checked(make_cfg, nothing_loads, tmp_path):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"conversation": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"no field\(s\) \['messages'\].*fix data.sft.sources"):
        validate(make_cfg("stage=ilkd", f"data.sft.sources=[{{path: '{wrong}'}}]"))
    with pytest.raises(DataError, match="fix data.preference.source"):
        validate(make_cfg("stage=pipeline", f"data.preference.source=[{{path: '{tmp_path / 'none.jsonl'}'}}]"))


def test_teacher_directories(tmp_path, make_cfg, nothing_loads):
    d = tmp_path / "teacher"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        check_spec(str(d))
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds no \*.safetensors weights"):
        check_spec(str(d))
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")  # cut short
    with pytest.raises(ConfigError, match="safetensors file .* cannot be read"):
        check_spec(str(d))
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedTeacherError, match="'gpt2'"):
        check_spec(str(d))
    assert check_spec(str(d), tokenizer_only=True) is None  # a tokenizer directory needs its files only
    with pytest.raises(UnsupportedTeacherError, match=f"model.kd_teacher={d}: model directory .* 'gpt2' model"):
        validate(make_cfg("stage=pipeline", f"model.kd_teacher={d}"))


def test_a_bad_teacher_is_named_by_the_key_the_user_set(make_cfg, nothing_loads):
    # kd reads model.kd_teacher, which is ${model.teacher} unless set: the message names the key on the command line
    with pytest.raises(TeacherLoadError, match=r"^model\.teacher=/nonexistent/path: teacher path"):
        check_reference(make_cfg("stage=kd", "model.teacher=/nonexistent/path"), "model.kd_teacher")
    with pytest.raises(TeacherLoadError, match=r"^model\.kd_teacher=/nonexistent/kd: teacher path"):
        check_reference(make_cfg("stage=kd", "model.kd_teacher=/nonexistent/kd"), "model.kd_teacher")


def test_teacher_specs(monkeypatch):
    with pytest.raises(TeacherLoadError, match="does not exist.*give an existing GGUF file"):
        check_spec("/nonexistent/path")
    with pytest.raises(TeacherLoadError, match="seed after 'random:' must be an integer"):
        check_spec("random:x")
    assert check_spec("random:3") is None
    with pytest.raises(ConfigError, match="random model, which has no tokenizer"):
        check_spec("random:3", tokenizer_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="'zebra-test/no-such-model' is not in the local Hugging Face cache"):
        check_spec("zebra-test/no-such-model")


def test_gguf_headers_give_the_layers_and_catch_damage(tmp_path, nothing_loads):
    from zebra.compose.teacher import embedded_gguf_path

    whole = tmp_path / "copy-never-converted.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        data = f.read()
    whole.write_bytes(data + b"\0")  # another file's content: no converted cache, so its header is read
    assert check_spec(str(whole)) == 30
    for size in (1 << 20, 50 << 20):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ConfigError, match=f"GGUF file {cut} is damaged or incomplete.*download or copy it again"):
            check_spec(str(cut))


def test_every_error_is_an_input_error():
    for cls in (ConfigError, DataError, TeacherLoadError, UnsupportedTeacherError, MissingArtifactError):
        assert issubclass(cls, ZebraInputError)
    assert issubclass(DataError, ValueError) and issubclass(TeacherLoadError, OSError)  # callers' excepts still hold
