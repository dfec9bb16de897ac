"""train.py in subprocesses (one per rank when a launcher starts several), small local data, and the step traces
written by zebra.launch.trainer.StepTrace: what the scale-out and Slurm tests share."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from zebra.data.synthetic import write_sft
from zebra.launch.proctree import kill_tree
from zebra.launch.trainer import read_step_trace

REPO = Path(__file__).resolve().parents[2]
TRAIN = str(REPO / "train.py")


@functools.cache
def _convert_default_teacher(cache: str | None) -> None:
    from zebra.compose.teacher import load_tokenizer

    load_tokenizer()


def subprocess_env(**extra: str) -> dict:
    """The environment of a train.py process. The embedded teacher (whose tokenizer the tiny preset uses) is
    converted into the session's cache here first, once, not by every rank of the run at the same time."""
    _convert_default_teacher(os.environ.get("ZEBRA_CACHE"))
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"})
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)  # never inherit a launcher's variables from the test runner
    env.update(extra)
    return env


def train_command(args: list[str], nproc: int | None = None) -> list[str]:
    """`python train.py args` or, with nproc, `torchrun --standalone --nproc-per-node=nproc train.py args`."""
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", TRAIN,
                *args]
    return [sys.executable, TRAIN, *args]


def start(args: list[str], *, nproc: int | None = None, cwd: Path | None = None,
          env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(train_command(args, nproc), cwd=str(cwd or REPO), env=env or subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)  # torchrun's workers too: they run in sessions of their own
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(proc.args)} did not finish within {timeout} s\n{out[-3000:]}\n{err[-5000:]}")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} exited {proc.returncode}\n--- stdout\n{out[-4000:]}\n"
                             f"--- stderr\n{err[-6000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train(args: list[str], *, nproc: int | None = None, timeout: float = 300, cwd: Path | None = None,
          env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py (under torchrun with nproc) to the end."""
    return finish(start(args, nproc=nproc, cwd=cwd, env=env), timeout=timeout, check=check)


def trace_runs(path: Path) -> list[list[dict]]:
    """The StepTrace at `path`, one list of records per fit (stage, or resumed attempt)."""
    return read_step_trace(path)


def step_losses(run: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run if r["event"] == "step"}


def tiny_data(directory: Path, n: int = 80, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_sft(directory / "sft.jsonl", n=n, seed=seed)


def padded_tokens_per_batch(data: Path, split: str, seq_len: int, global_batch: int, max_tokens: int,
                            heldout_fraction: float) -> list[int]:
    """Padding tokens in each global batch a stage will train on (one process; the rows do not depend on how
    they are spread over ranks)."""
    from zebra.data.sft import TokenMixtureDataModule
    from zebra.stages.teacher import load_model_tokenizer

    dm = TokenMixtureDataModule(tokenizer=load_model_tokenizer("smollm2_135m"), sources=[{"path": str(data)}],
                                split=split, seq_len=seq_len, batch_size=global_batch, max_tokens=max_tokens,
                                heldout_fraction=heldout_fraction, chat_template="tokenizer", seed=42)
    dm.setup()
    return [int((b["attention_mask"] == 0).sum()) for b in dm.train_dataloader(0, 1)]


def assert_same_loss_curves(one: Path, two: Path, stages: tuple[str, ...], steps: int, rel: float = 1e-4) -> None:
    """The step traces under `one` (one process) and `two` (two processes) hold one fit per stage, each with the
    same step losses (within `rel`), and the loss moved over the steps (else the comparison says nothing)."""
    import pytest

    runs_one, runs_two = trace_runs(one / "trace.jsonl"), trace_runs(two / "trace.jsonl")
    assert len(runs_one) == len(runs_two) == len(stages), f"one fit per stage {stages}"
    for stage, a, b in zip(stages, runs_one, runs_two):
        assert a[0]["world_size"] == 1 and b[0]["world_size"] == 2
        la, lb = step_losses(a), step_losses(b)
        assert sorted(la) == sorted(lb) == list(range(steps)), (stage, la, lb)
        for s in la:
            assert lb[s] == pytest.approx(la[s], rel=rel, abs=1e-6), (stage, s, la, lb)
        assert la[steps - 1] != la[0], f"{stage}: the loss must move, or the comparison says nothing"
