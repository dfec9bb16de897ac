"""Two "nodes" on one machine (a multi-node rehearsal on CPU): two torchrun launcher groups with distinct node ranks
and one rendezvous on loopback, as Slurm would start them, run `kd` under ZeRO-3 with `trainer.num_nodes=2`.

The loss of every step matches a one-node run of the same processes on the same global batch, every trained tensor
moves (the stage's own check, gathered from the shards), and the export consolidates and loads with the in-memory
model's logits.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import TRAIN, finish, start, step_losses, subprocess_env, tiny_data, trace_runs

pytestmark = pytest.mark.slow

SEQ, STEPS, PER_RANK = 32, 3, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(root: Path, data: Path, nodes: int, per_node: int) -> list[str]:
    return [
        "stage=kd", "model=tiny", "mix=paper", "kd.student_init=random", "logger=none", "strategy=deepspeed_zero3",
        "trainer=ddp_cpu", f"trainer.devices={per_node}", f"trainer.num_nodes={nodes}", f"paths.root={root}",
        "trainer.enable_progress_bar=false", "num_threads=1", f"data.sft.sources=[{{path: '{data}'}}]",
        "data.sft.heldout_fraction=0.1", "export_check=true", "check_weights_moved=true",
        f"kd.seq_len={SEQ}", f"kd.batch_size={PER_RANK}", f"kd.max_steps={STEPS}", "kd.checkpoint_every_n_steps=0",
        "kd.heldout_batches=0", "kd.optimizer.lr=1e-3",
        "+callbacks.trace._target_=zebra.launch.trainer.StepTrace", f"+callbacks.trace.path={root / 'trace.jsonl'}",
    ]


def test_two_launcher_groups_match_one_node(tmp_path):
    data = tiny_data(tmp_path / "data", n=300)
    one, two = tmp_path / "one", tmp_path / "two"
    finish(start(overrides(one, data, nodes=1, per_node=2), nproc=2), timeout=600)

    port = free_port()
    groups = []
    for node_rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node_rank}",
               "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", TRAIN,
               *overrides(two, data, nodes=2, per_node=1)]
        groups.append(subprocess.Popen(cmd, cwd=str(Path(TRAIN).parent), env=subprocess_env(), text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in groups:
        finish(proc, timeout=600)

    a, b = trace_runs(one / "trace.jsonl"), trace_runs(two / "trace.jsonl")
    assert len(a) == len(b) == 1 and a[0][0]["world_size"] == b[0][0]["world_size"] == 2
    la, lb = step_losses(a[0]), step_losses(b[0])
    assert sorted(la) == sorted(lb) == list(range(STEPS))
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-5), (s, la, lb)
    assert la[STEPS - 1] < la[0]

    report = json.loads((two / "tiny" / "paper" / "kd" / "report.json").read_text())
    assert report["weights_moved"]["unchanged"] == [] and report["weights_moved"]["tensors"] > 10
    assert report["export_check"]["equal"], report["export_check"]
    assert (two / "tiny" / "paper" / "kd" / "model" / "model.safetensors").is_file()
