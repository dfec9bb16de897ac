"""The teacher cache across processes (CPU, gloo): a two-rank build under torchrun writes the same shards as one
process, and KD from the cache under DDP and DeepSpeed ZeRO-3 (each rank streaming the cached rows of its own
batches) gives the one-process run's loss at every step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.runs import assert_same_loss_curves, finish, start, tiny_data

pytestmark = pytest.mark.slow

GLOBAL_BATCH, SEQ, STEPS = 4, 32, 3
CACHE = "tiny/teacher_cache"


def overrides(root: Path, data: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "model=tiny", "mix=uniform", "mix.n_mla=2", "logger=none", f"paths.root={root}",
        "trainer.enable_progress_bar=false", "num_threads=1", f"data.sft.sources=[{{path: '{data}'}}]",
        "data.sft.heldout_fraction=0.1", f"kd.seq_len={SEQ}", f"kd.batch_size={batch_size}",
        f"kd.tokens={GLOBAL_BATCH * SEQ * STEPS}", "kd.checkpoint_every_n_steps=0", "kd.heldout_batches=0",
        "kd.student_init=random", "teacher_cache.top_k=64", "teacher_cache.rows_per_shard=16",
        # lr ~0 (updates below fp32 resolution; 0 itself is refused): every step's loss then depends on its rows
        # alone, so equal curves show that each rank streams the cached values of its own rows at every step (with
        # training, the top-64 loss of a random student to a near-uniform random teacher is ~100x smaller than the
        # dense one and its updates amplify the ranks' rounding: 3e-4 relative apart by step 2, 3e-6 online)
        "kd.optimizer.lr=1e-12",
        "+callbacks.trace._target_=zebra.launch.trainer.StepTrace", f"+callbacks.trace.path={root / 'trace.jsonl'}",
        *extra,
    ]


def shard_bytes(root: Path) -> dict[str, bytes]:
    (d,) = [p.parent for p in (root / CACHE).glob("*/manifest.json")]
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def kd_report(root: Path) -> dict:
    return json.loads((root / "tiny" / "2mla-uniform" / "kd" / "report.json").read_text())


def test_two_rank_build_and_kd_from_the_cache_under_ddp_and_zero3(tmp_path):
    data = tiny_data(tmp_path / "data", n=300)
    built1, built2 = tmp_path / "built1", tmp_path / "built2"
    finish(start(overrides(built2, data, 2, "stage=teacher_cache", "trainer=ddp_cpu", "strategy=ddp"), nproc=2),
           timeout=600)
    finish(start(overrides(built1, data, 4, "stage=teacher_cache")), timeout=600)
    reference = shard_bytes(built1)
    assert len(reference) > 3 and shard_bytes(built2) == reference

    runs = {"one": ([], None), "two": (["trainer=ddp_cpu", "strategy=ddp"], 2),
            "z3one": (["strategy=deepspeed_zero3"], None),
            "z3two": (["strategy=deepspeed_zero3", "trainer=ddp_cpu"], 2)}
    for name, (extra, nproc) in runs.items():
        root = tmp_path / name
        shutil.copytree(built2 / CACHE, root / CACHE)
        batch = GLOBAL_BATCH // (nproc or 1)
        finish(start(overrides(root, data, batch, "stage=kd", "kd.teacher_source=cache", *extra), nproc=nproc),
               timeout=900)
        report = kd_report(root)
        assert report["teacher_source"] == "cache" and report["teacher_cache"].startswith(str(root / CACHE))
        assert report["steps"] == STEPS
    assert_same_loss_curves(tmp_path / "one", tmp_path / "two", ("kd",), STEPS, rel=1e-5)
    assert_same_loss_curves(tmp_path / "z3one", tmp_path / "z3two", ("kd",), STEPS, rel=1e-5)
