"""Stage `teacher_cache` on the tiny preset: the cached rows hold the teacher's top-k of those rows (and, with
tail_samples, draws from its distribution outside them), a resumed or two-rank build writes the same bytes as one
uninterrupted build, a build that cannot fit the disk or whose settings are wrong refuses before anything loads, KD
from a cache with k = vocab follows online KD's losses step for step, and KD trains from a cache's tail draws."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stage_helpers import compose_cfg, tiny_overrides, write_preferences, write_sft
from zebra.stages import artifacts, teacher_cache
from zebra.stages.errors import MissingArtifactError, StageError
from zebra.stages.run import run
from zebra.stages.teacher import load_teacher_model, teacher_forward

SEQ, BATCH, STEPS = 16, 2, 3
VOCAB = 49152


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict:
    """Few conversations, so that a k = vocab cache of the whole KD split stays near 100 MB."""
    d = tmp_path_factory.mktemp("small-data")
    return {"sft": write_sft(d / "sft.jsonl", n=10), "pref": write_preferences(d / "pref.jsonl", n=4)}


def cache_cfg(root: Path, data: dict, *extra: str):
    return compose_cfg(tiny_overrides(root, data, [
        f"kd.seq_len={SEQ}", f"kd.batch_size={BATCH}", f"kd.tokens={SEQ * BATCH * STEPS}", "kd.heldout_batches=0",
        "kd.student_init=random", "teacher_cache.top_k=8", "teacher_cache.rows_per_shard=3",
        "teacher_cache.batch_size=2", *extra]))


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def safetensors_of(d: Path, name: str) -> torch.Tensor:
    """One tensor of all shards of a cache directory, in row order."""
    from safetensors.torch import load_file

    return torch.cat([load_file(str(p))[name] for p in sorted(d.glob("shard-*.safetensors"))])


def test_cached_rows_hold_the_teachers_top_k(tmp_path, small_data):
    cfg = cache_cfg(tmp_path / "a", small_data, "stage=teacher_cache", "kd.module.temperature=2.0")
    report = run(cfg)
    d = teacher_cache.cache_dir(cfg)
    assert report["cache_dir"] == str(d) and artifacts.is_done(cfg, "teacher_cache")
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["top_k"] == 8 and manifest["seq_len"] == SEQ and manifest["bytes_per_token"] == 8 * 6 + 4
    n = manifest["num_rows"]
    assert manifest["num_shards"] == -(-n // 3) == len(list(d.glob("shard-*.safetensors")))
    assert sum(p.stat().st_size for p in d.glob("shard-*")) >= n * SEQ * manifest["bytes_per_token"]
    cache = teacher_cache.TeacherCache(d)
    _, rows = teacher_cache.kd_rows(cfg, teacher_cache.load_model_tokenizer(cfg.model.tokenizer))
    teacher = load_teacher_model(str(cfg.model.kd_teacher), cfg.model.base).model
    for r in (0, n // 2, n - 1):
        item = rows[r]
        h = teacher_forward(teacher, item["input_ids"][None], item["position_ids"][None],
                            item["attention_mask"][None]).last_hidden_state[0]
        logp = torch.log_softmax((h @ teacher.lm_head.weight.t()) / 2.0, -1)
        top, ids = logp.topk(8, -1)
        got = cache.row(r)
        assert got[teacher_cache.IDS].dtype == torch.int32 and got[teacher_cache.LOGPROBS].dtype == torch.bfloat16
        assert torch.equal(got[teacher_cache.IDS].long(), ids)
        torch.testing.assert_close(got[teacher_cache.LOGPROBS].float(), top, rtol=1e-2, atol=1e-2)  # bf16 storage
        torch.testing.assert_close(got[teacher_cache.TAIL], torch.log1p(-top.exp().sum(-1)), rtol=1e-4, atol=1e-5)
    assert set(got) == {teacher_cache.IDS, teacher_cache.LOGPROBS, teacher_cache.TAIL}  # no tail draws by default
    assert manifest["tail_samples"] == 0
    with pytest.raises(IndexError, match="outside"):
        cache.row(n)


def test_tail_samples_are_draws_from_the_teachers_tail(tmp_path, small_data):
    """tail_samples = s: s ids per token drawn from the teacher's distribution outside its top-k (renormalised),
    never a top-k id, stored with the teacher's log-probs at them, at that distribution's frequencies. The cold
    temperature sharpens the tiny random teacher (at T = 1 it is near uniform over 49k ids) so that a few thousand
    draws per token show the frequencies: ~200 tail ids carry most of the mass, the largest up to 3.5% of it."""
    s, temperature = 2048, 0.05
    cfg = cache_cfg(tmp_path, small_data, "stage=teacher_cache", f"kd.module.temperature={temperature}",
                    f"teacher_cache.tail_samples={s}")
    report = run(cfg)
    d = teacher_cache.cache_dir(cfg)
    manifest = json.loads((d / "manifest.json").read_text())
    bpt = (8 + s) * (4 + 2) + 4
    assert manifest["tail_samples"] == s and manifest["seed"] == 0
    assert manifest["bytes_per_token"] == report["bytes_per_token"] == bpt
    assert teacher_cache.bytes_per_token(8, "bf16", s) == bpt
    n, shards = manifest["num_rows"], sorted(d.glob("shard-*.safetensors"))
    # the format's bytes exactly, plus one small safetensors header per shard
    assert 0 <= sum(p.stat().st_size for p in shards) - n * SEQ * bpt < 1024 * len(shards)
    cache = teacher_cache.TeacherCache(d)
    _, rows = teacher_cache.kd_rows(cfg, teacher_cache.load_model_tokenizer(cfg.model.tokenizer))
    teacher = load_teacher_model(str(cfg.model.kd_teacher), cfg.model.base).model
    for r in (0, n - 1):
        item = rows[r]
        h = teacher_forward(teacher, item["input_ids"][None], item["position_ids"][None],
                            item["attention_mask"][None]).last_hidden_state[0]
        logp = torch.log_softmax((h @ teacher.lm_head.weight.t()) / temperature, -1)
        got = cache.row(r)
        top, draws = got[teacher_cache.IDS].long(), got[teacher_cache.TAIL_IDS]
        assert draws.dtype == torch.int32 and draws.shape == (SEQ, s)
        assert got[teacher_cache.TAIL_LOGPROBS].dtype == torch.bfloat16
        assert not (draws[:, :, None].long() == top[:, None, :]).any()
        torch.testing.assert_close(got[teacher_cache.TAIL_LOGPROBS].float(), logp.gather(-1, draws.long()),
                                   rtol=1e-2, atol=1e-2)  # bf16 storage
        rest = logp.scatter(-1, top, float("-inf"))
        conditional = (rest - rest.logsumexp(-1, keepdim=True)).exp()
        freq = torch.zeros(SEQ, VOCAB).scatter_add_(-1, draws.long(), torch.ones(SEQ, s)) / s
        assert float(conditional.max()) > 0.025  # draws that ignored the teacher would miss the bound below
        # binomial standard deviation at most sqrt(0.035 / s) = 0.0041 at the largest conditional probabilities
        assert float((freq - conditional).abs().max()) < 0.015


def test_tail_sample_settings_are_refused_before_anything_loads(tmp_path, small_data, monkeypatch):
    def nothing(*_a, **_k):
        raise AssertionError("nothing may load before the settings are checked")

    monkeypatch.setattr(teacher_cache, "load_model_tokenizer", nothing)
    monkeypatch.setattr("zebra.stages.kd.load_kd_teacher", nothing)
    with pytest.raises(StageError, match=r"teacher_cache.tail_samples must be >= 0 .*got -1"):
        run(cache_cfg(tmp_path, small_data, "stage=teacher_cache", "teacher_cache.tail_samples=-1"))
    with pytest.raises(StageError, match=r"teacher_cache.tail_samples=4 draws ids outside the top-k, but "
                                         rf"teacher_cache.top_k={VOCAB} is the whole vocabulary"):
        run(cache_cfg(tmp_path, small_data, "stage=teacher_cache", f"teacher_cache.top_k={VOCAB}",
                      "teacher_cache.tail_samples=4"))


@pytest.mark.slow
@pytest.mark.parametrize("tail_samples", [0, 4])
def test_resumed_and_two_rank_builds_write_the_same_bytes(tmp_path, small_data, monkeypatch, tail_samples):
    tail = f"teacher_cache.tail_samples={tail_samples}"
    whole = cache_cfg(tmp_path / "whole", small_data, tail)
    teacher_cache.build(whole, rank=0, world=1)
    reference = shard_bytes(teacher_cache.cache_dir(whole))
    assert len(reference) >= 4  # manifest + at least three shards

    # killed after two shards: those are kept, the rest is built by the next run
    killed = cache_cfg(tmp_path / "killed", small_data, tail)
    real_write, written = teacher_cache.write_shard, []

    def write_then_die(path, *args):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        real_write(path, *args)
        written.append(path.name)

    monkeypatch.setattr(teacher_cache, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache.build(killed, rank=0, world=1)
    d = teacher_cache.cache_dir(killed)
    assert sorted(p.name for p in d.iterdir()) == sorted(written)  # no manifest, no temporary file
    monkeypatch.setattr(teacher_cache, "write_shard", real_write)
    again = teacher_cache.build(killed, rank=0, world=1)
    assert again["shards_built_here"] == len(reference) - 1 - 2
    assert shard_bytes(d) == reference

    # two ranks, each its own shards; rank 0 writes the manifest once every shard exists
    two = cache_cfg(tmp_path / "two", small_data, tail)
    with pytest.raises(StageError, match="shards missing"):
        teacher_cache.build(two, rank=0, world=2)
    teacher_cache.build(two, rank=1, world=2)
    assert not (teacher_cache.cache_dir(two) / "manifest.json").exists()
    assert teacher_cache.build(two, rank=0, world=2)["shards_built_here"] == 0
    assert shard_bytes(teacher_cache.cache_dir(two)) == reference
    if tail_samples:
        # the draws do not depend on how many rows one teacher forward takes (one draw per row, in row order)
        other = cache_cfg(tmp_path / "batch3", small_data, tail, "teacher_cache.batch_size=3")
        teacher_cache.build(other, rank=0, world=1)
        draws = safetensors_of(teacher_cache.cache_dir(whole), "tail_ids")
        assert draws.shape[-1] == tail_samples
        assert torch.equal(safetensors_of(teacher_cache.cache_dir(other), "tail_ids"), draws)


def test_build_refuses_when_the_disk_is_too_small(tmp_path, small_data, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10**6, 10**6 - 1000, 1000))

    def no_teacher(*_a, **_k):
        raise AssertionError("the teacher must not load before the disk check")

    monkeypatch.setattr("zebra.stages.kd.load_kd_teacher", no_teacher)
    with pytest.raises(StageError, match=r"needs .* GiB more .* bytes/token.* GiB free"):
        run(cache_cfg(tmp_path, small_data, "stage=teacher_cache", "teacher_cache.top_k=64"))
    with pytest.raises(StageError, match="top_k must be between 1 and the vocabulary size"):
        run(cache_cfg(tmp_path, small_data, "stage=teacher_cache", f"teacher_cache.top_k={VOCAB + 1}"))
    with pytest.raises(StageError, match="logprob_dtype"):
        run(cache_cfg(tmp_path, small_data, "stage=teacher_cache", "teacher_cache.logprob_dtype=int8"))


def test_kd_names_a_missing_or_mismatched_cache(tmp_path, small_data):
    run(cache_cfg(tmp_path, small_data, "stage=teacher_cache"))
    with pytest.raises(MissingArtifactError, match=r"stage=teacher_cache.*other settings.*top_k: cache 8 vs this "
                                                   r"run 16"):
        run(cache_cfg(tmp_path, small_data, "stage=kd", "kd.teacher_source=cache", "teacher_cache.top_k=16"))
    with pytest.raises(MissingArtifactError, match=r"seq_len: cache 16 vs this run 8"):
        run(cache_cfg(tmp_path, small_data, "stage=kd", "kd.teacher_source=cache", "kd.seq_len=8"))
    # a cache whose recorded data differ from what this run reads (e.g. the data files changed under it)
    cfg = cache_cfg(tmp_path, small_data, "stage=kd", "kd.teacher_source=cache")
    manifest = teacher_cache.cache_dir(cfg) / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "data_id": "other", "tokenizer": "other"}))
    with pytest.raises(teacher_cache.TeacherCacheMismatchError, match=r"tokenizer: cache 'other'.*data_id"):
        run(cfg)
    assert not (artifacts.stage_dir(cfg, "kd") / "report.json").exists()
    with pytest.raises(StageError, match="teacher_source must be 'online' or 'cache'"):
        run(cache_cfg(tmp_path, small_data, "stage=kd", "kd.teacher_source=disk"))


@pytest.mark.slow
def test_kd_from_a_full_vocab_cache_follows_online_kd(tmp_path, small_data):
    full = ["teacher_cache.top_k=49152", "teacher_cache.logprob_dtype=fp32", "kd.module.ce_weight=0.1", "export=false"]
    online = run(cache_cfg(tmp_path / "online", small_data, "stage=kd", *full))
    root = tmp_path / "cached"
    built = run(cache_cfg(root, small_data, "stage=teacher_cache", *full))
    assert built["bytes_per_token"] == VOCAB * 8 + 4
    cached = run(cache_cfg(root, small_data, "stage=kd", "kd.teacher_source=cache", *full))
    assert cached["teacher_source"] == "cache" and cached["teacher_cache"] == built["cache_dir"]
    assert cached["steps"] == online["steps"] == STEPS
    torch.testing.assert_close(torch.tensor(cached["loss_history"], dtype=torch.float64),
                               torch.tensor(online["loss_history"], dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert cached["loss_history"][0] != cached["loss_history"][-1]  # the student trained


def test_kd_from_a_cache_with_tail_samples(tmp_path, small_data):
    tail = "teacher_cache.tail_samples=4"
    built = run(cache_cfg(tmp_path, small_data, "stage=teacher_cache", tail))
    assert built["tail_samples"] == 4 and built["bytes_per_token"] == (8 + 4) * 6 + 4
    cached = run(cache_cfg(tmp_path, small_data, "stage=kd", "kd.teacher_source=cache", tail, "export=false"))
    assert cached["teacher_source"] == "cache" and cached["teacher_cache"] == built["cache_dir"]
    assert cached["steps"] == STEPS
    losses = torch.tensor(cached["loss_history"], dtype=torch.float64)
    assert torch.isfinite(losses).all() and losses[0] != losses[-1]  # the student trained
    # the draws reach the loss: from the same rows' cache without them, the first step's loss differs
    root = tmp_path / "bucket"
    run(cache_cfg(root, small_data, "stage=teacher_cache"))
    bucket = run(cache_cfg(root, small_data, "stage=kd", "kd.teacher_source=cache", "export=false"))
    assert bucket["loss_history"][0] != pytest.approx(cached["loss_history"][0], rel=1e-3)
    # a KD run whose tail_samples differ from its cache's: no cache for its settings, and which setting differs
    with pytest.raises(MissingArtifactError, match=r"other settings.*tail_samples: cache 4 vs this run 2"):
        run(cache_cfg(tmp_path, small_data, "stage=kd", "kd.teacher_source=cache", "teacher_cache.tail_samples=2"))
    cfg = cache_cfg(tmp_path, small_data, "stage=kd", "kd.teacher_source=cache", tail)
    manifest = teacher_cache.cache_dir(cfg) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "tail_samples": 2}))
    with pytest.raises(teacher_cache.TeacherCacheMismatchError, match=r"tail_samples: cache 2 vs this run 4"):
        run(cfg)
