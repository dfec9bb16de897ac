"""The teacher-cache benchmark's smoke run on CPU: the GPU run's code path at tiny shapes (benchmarks.teacher_cache)."""

from __future__ import annotations

import json

from benchmarks import teacher_cache as bench
from zebra.stages.teacher_cache import bytes_per_token


def test_smoke_run_writes_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(["--smoke", "--device", "cpu", "--out", str(out), "--batch", "1", "--ks", "4,32",
                         "--warmup", "0", "--iters", "1", "--cache-dir", str(tmp_path / "caches")])
    js = json.loads(out.read_text())
    assert js["summary"] == json.loads(json.dumps(report["summary"]))
    assert js["micro_batch"] == 1 and js["seq_len"] == 64 and js["online"]["tokens_per_step"] == 64
    for k in (4, 32):
        build, cached = js["build"][str(k)], js["cached"][str(k)]
        assert build["tokens"] == 4 * 64 and build["bytes_per_token_formula"] == bytes_per_token(k, "bf16")
        # the shard holds exactly the formula's bytes plus one small safetensors header
        assert 0 <= build["file_bytes"] - build["tokens"] * build["bytes_per_token_formula"] < 1024
        assert (tmp_path / "caches" / f"k{k}" / "shard-00000.safetensors").stat().st_size == build["file_bytes"]
        assert cached["tokens_per_s"] > 0 and cached["speedup_vs_online"] > 0
        assert js["summary"][f"k{k}"]["bytes_per_token"] == build["bytes_per_token"]
    assert js["teacher_weights_gib"] > 0 and js["configs"]["kd_teacher"]["hidden_size"] == 96
