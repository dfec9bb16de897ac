"""A Hydra multirun sweep of `stage=describe` over `mix.n_mla` prints one JSON line per job, the KV fraction grows
with the number of MLA layers, and each job writes its description into its own deterministic artifact directory
(the mix's name carries n_mla)."""

from __future__ import annotations

import json

from tests.helpers.runs import train


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_describe_sweep_over_n_mla(tmp_path):
    root = tmp_path / "artifacts"
    proc = train(["-m", "stage=describe", "model=zebra_1b", "mix=uniform", "mix.n_mla=2,4,8", f"paths.root={root}"],
                 timeout=180)
    jobs = json_lines(proc.stdout)
    assert [j["mix"] for j in jobs] == ["2mla-uniform", "4mla-uniform", "8mla-uniform"]
    assert [j["layer_types"].count("mla") for j in jobs] == [2, 4, 8]
    kv = [j["kv_fraction"] for j in jobs]
    assert kv[0] < kv[1] < kv[2]
    assert kv[1] == 2 * kv[0] and kv[2] == 2 * kv[1]  # cache grows linearly with MLA layers (Mamba2's is constant)
    # one deterministic directory per job: <root>/<model>/<mix.name>/describe.json, holding that job's line
    paths = [root / "zebra_1b" / j["mix"] / "describe.json" for j in jobs]
    assert len(set(paths)) == 3
    for job, path in zip(jobs, paths):
        assert job["written_to"] == str(path)
        assert json.loads(path.read_text())["kv_fraction"] == job["kv_fraction"]
    # Hydra's multirun made one job directory each
    assert sorted(p.parent.name for p in (root / "logs" / "hydra" / "multirun").rglob(".hydra")) == ["0", "1", "2"]
