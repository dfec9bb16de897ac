"""Bad input fails early with a message naming the problem, and never leaves a partial model/ export."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from zebra.stages.errors import MissingArtifactError, NonFiniteLossError, StageError, TokenizerMismatchError
from zebra.stages.run import run
from tests.helpers.runs import finish, start, subprocess_env, train


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


# ------------------------------------------------------------------------------------------------ the command line
# Each bad input, run as a user runs it (train.py in a process of its own): exit status 2, one line on stderr
# naming the input and the fix, and every earlier artifact byte-identical afterwards. All fail before any model,
# teacher or data loads, so the processes start together and the rows cost about one start-up.
ROWS = {
    "missing_teacher_path": (["stage=ilkd", "model.teacher=/nonexistent/path"],
                             "model.teacher=/nonexistent/path: teacher path '/nonexistent/path' does not exist"),
    "truncated_gguf": (["stage=ilkd", "model.teacher={truncated}"],
                       "model.teacher={truncated}: GGUF file {truncated} is damaged or incomplete (1,048,576 bytes"),
    "kd_batch_size_0": (["stage=kd", "kd.batch_size=0"], "kd.batch_size must be a positive integer, got 0"),
    "kd_max_steps_negative": (["stage=kd", "kd.max_steps=-1"],
                              "kd.max_steps must be a positive integer or null, got -1"),
    "explicit_mix_without_layers": (["stage=kd", "mix=explicit"], "mix=explicit needs mix.mla_layers"),
    "pipeline_mix_larger_than_model": (["stage=pipeline", "mix=smart", "mix.n_mla=6"],
                                       "mix.n_mla=6 is larger than the number of layers (4) of tiny"),
    "lr_zero": (["stage=ilkd", "ilkd.optimizer.lr=0"], "ilkd.optimizer.lr must be a positive number, got 0"),
    "missing_data_file": (["stage=pipeline", "data.sft.sources=[{path: /nonexistent/sft.jsonl}]"],
                          "data file not found: /nonexistent/sft.jsonl"),
    "tokenizer_is_random": (["stage=ilkd", "model.tokenizer=random:1"],
                            "model.tokenizer=random:1: 'random:1' names a random model, which has no tokenizer"),
    "data_without_tokens": (["stage=ilkd", "data.sft.sources=[{path: {empty_text}, text_field: text}]"],
                            "data source {empty_text} has no tokens after formatting"),
    "unknown_stage": (["stage=nope"], "stage=nope is not an option of the config group stage (choices: describe, dpo"),
}


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every artifact file under a run's root (its model directory; Hydra's logs/ are new per run), by
    relative path."""
    models = root / "tiny"
    return {str(p.relative_to(models)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(models.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_files):
    """A finished tiny pipeline (every stage's export), the earlier artifacts each bad input must leave alone."""
    from stage_helpers import compose_cfg, tiny_overrides

    root = tmp_path_factory.mktemp("finished")
    run(compose_cfg(tiny_overrides(root, data_files, ["stage=pipeline"])))
    return root


@pytest.fixture(scope="module")
def truncated_gguf(tmp_path_factory) -> Path:
    """The first MB of the embedded teacher's GGUF (a download cut short)."""
    from zebra.compose.teacher import embedded_gguf_path

    path = tmp_path_factory.mktemp("gguf") / "cut.gguf"
    with open(embedded_gguf_path(), "rb") as f:
        path.write_bytes(f.read(1 << 20))
    return path


@pytest.fixture(scope="module")
def empty_text(tmp_path_factory) -> Path:
    """A well-formed jsonl whose every text is empty: nothing left to train on once formatted."""
    path = tmp_path_factory.mktemp("empty-text") / "empty.jsonl"
    path.write_text('{"text": ""}\n' * 50)
    return path


def placeholders(text: str, truncated_gguf: Path, empty_text: Path) -> str:
    return text.replace("{truncated}", str(truncated_gguf)).replace("{empty_text}", str(empty_text))


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, finished_run, data_files, truncated_gguf, empty_text):
    """Every row of ROWS started at once, each on its own copy of the finished run: name -> (result, root,
    digest before)."""
    from stage_helpers import tiny_overrides

    started = {}
    for name, (args, _) in ROWS.items():
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(finished_run, root, dirs_exist_ok=True)
        args = [placeholders(a, truncated_gguf, empty_text) for a in args]
        started[name] = (start(tiny_overrides(root, data_files, args)), root, tree_digest(root))
    return {name: (finish(proc, timeout=600, check=False), root, before)
            for name, (proc, root, before) in started.items()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_and_status_2(row, bad_input_runs, truncated_gguf, empty_text):
    result, root, before = bad_input_runs[row]
    expected = placeholders(ROWS[row][1], truncated_gguf, empty_text)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stderr[-3000:]
    assert "(" in lines[0] and lines[0].endswith(")"), f"the line says how to fix it: {lines[0]}"
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr, result.stderr[-3000:]
    assert tree_digest(root) == before, "an earlier artifact changed"


def test_debug_adds_the_traceback(finished_run, data_files, tmp_path):
    from stage_helpers import tiny_overrides

    procs = [start(tiny_overrides(finished_run, data_files, ["stage=kd", "kd.batch_size=0", "debug=true"])),
             start(tiny_overrides(finished_run, data_files, ["stage=kd", "kd.batch_size=0"]),
                   env=subprocess_env(HYDRA_FULL_ERROR="1"))]
    for proc in procs:
        result = finish(proc, check=False)
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" in result.stderr and "zebra.errors.ConfigError: kd.batch_size" in result.stderr
        assert error_lines(result.stderr)[-1].startswith("error: kd.batch_size must be a positive integer")


def test_multirun_reports_every_bad_job_and_exits_2(finished_run, data_files, tmp_path):
    from stage_helpers import tiny_overrides

    before = tree_digest(finished_run)
    args = tiny_overrides(finished_run, data_files, ["stage=kd", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    result = train(["-m", *args, "kd.batch_size=0,-3"], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert any(line.startswith("error: job #0 (") and "got 0" in line for line in lines), result.stderr[-3000:]
    assert any(line.startswith("error: job #1 (") and "got -3" in line for line in lines), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert tree_digest(finished_run) == before


def test_unexpected_errors_keep_their_traceback(data_files, tmp_path):
    from stage_helpers import tiny_overrides

    args = tiny_overrides(tmp_path / "art", data_files, ["stage=ilkd", "+callbacks.boom._target_=no.such.Thing"])
    result = train(args, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "no.such.Thing" in result.stderr and not error_lines(result.stderr)
    assert no_exports(tmp_path)


@pytest.mark.slow
def test_a_gguf_file_by_path_is_a_teacher(data_files, tmp_path):
    """model.teacher=<some .gguf> runs (a renamed copy of the embedded teacher: its conversion is reused)."""
    from stage_helpers import tiny_overrides

    from zebra.compose.teacher import embedded_gguf_path

    gguf = tmp_path / "my-teacher.gguf"
    shutil.copyfile(embedded_gguf_path(), gguf)
    args = tiny_overrides(tmp_path / "art", data_files, [
        "model=smollm2_135m", f"model.teacher={gguf}", "model.tokenizer=smollm2_135m", "stage=ilkd",
        "ilkd.students=mla", "ilkd.max_steps=1"])
    result = train(args, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "art" / "smollm2_135m" / "ilkd" / "mla" / "model" / "config.json").is_file()
