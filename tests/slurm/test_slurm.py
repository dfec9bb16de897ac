"""Acceptance 4 (issue 5) on a real single-node Slurm (tests/slurm/conftest.py), through Hydra's submitit launcher
(`hydra/launcher=submitit_slurm`, zebra's launcher class):

(a) a two-job multirun sweep completes and each job writes its artifacts into its own deterministic directory;
(b) a running job sent submitit's preemption / time-out signal (USR2, the requeue owner's signal; not scancel,
    which ends a job for good) is requeued (same job id, restart count 1) and resumes from its last checkpoint in
    the same directory, continuing the step count to the end;
(c) a job Slurm requeues by itself (`scontrol requeue`, as a preemption in REQUEUE mode or a node failure would)
    resumes the same way (SLURM_RESTART_COUNT > 0 -> ckpt_path=last).

Without accounting submitit cannot see a job that died: every wait below has a timeout, and the launcher process
is killed if it outlives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scale_helpers import REPO, TRAIN, read_trace, subprocess_env, tiny_data, trace_runs

pytestmark = pytest.mark.slurm

MAX_STEPS = 8


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    log = (cwd / "launcher.log").open("w")
    return subprocess.Popen([sys.executable, TRAIN, "-m", "hydra/launcher=submitit_slurm",
                             "hydra.launcher.timeout_min=60", *args], cwd=str(cwd), env=subprocess_env(),
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, cwd: Path, timeout: float, slurm) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError(f"the sweep did not finish within {timeout} s\n{tail(cwd / 'launcher.log')}\n"
                             f"{job_logs(cwd)}\n{slurm.logs()}")
    out = (cwd / "launcher.log").read_text()
    assert proc.returncode == 0, f"launcher exited {proc.returncode}\n{out[-4000:]}\n{job_logs(cwd)}"
    return out


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else f"({path} missing)"


def job_logs(cwd: Path) -> str:
    return "\n".join(f"--- {p}\n{tail(p, 40)}" for p in sorted(cwd.rglob(".submitit/*/*_log.*")))


def test_sweep_runs_on_slurm_into_distinct_directories(slurm, tmp_path):
    root = tmp_path / "artifacts"
    proc = launch(["stage=describe", "model=tiny", "mix=uniform", "mix.n_mla=2,4", f"paths.root={root}"], tmp_path)
    finish(proc, tmp_path, 180, slurm)
    written = {p.parent.name: json.loads(p.read_text()) for p in root.glob("tiny/*/describe.json")}
    assert sorted(written) == ["2mla-uniform", "4mla-uniform"]
    assert written["2mla-uniform"]["layer_types"].count("mla") == 2
    assert written["4mla-uniform"]["layer_types"].count("mla") == 4
    # both ran as tasks of one Slurm array (submitit's logs are named <array id>_<task>_<rank>_log.out)
    logs = sorted(p.name for p in tmp_path.rglob(".submitit/*/*_log.out"))
    assert len(logs) == 2 and {name.split("_")[0] for name in logs} == {logs[0].split("_")[0]}, logs
    assert all("Job completed successfully" in p.read_text() for p in tmp_path.rglob(".submitit/*/*_log.out"))


def ilkd_args(data: Path, root: Path, trace: Path) -> list[str]:
    return ["stage=ilkd", "model=tiny", "ilkd.students=mla", "logger=none", f"paths.root={root}",
            "trainer.enable_progress_bar=false", "num_threads=1", f"data.sft.sources=[{{path: '{data}'}}]",
            "data.sft.heldout_fraction=0.1", "ilkd.seq_len=32", "ilkd.batch_size=1", f"ilkd.max_steps={MAX_STEPS}",
            "ilkd.checkpoint_every_n_steps=1",
            "+callbacks.trace._target_=zebra.launch.trainer.StepTrace", f"+callbacks.trace.path={trace}",
            # each step lasts >= 1.5 s, so the job is still running when it is signalled
            "+callbacks.slow._target_=zebra.launch.trainer.Throttle", "+callbacks.slow.seconds=1.5"]


def interrupt_and_check_resume(slurm, tmp_path, interrupt) -> None:
    data = tiny_data(tmp_path / "data")
    root, trace = tmp_path / "artifacts", tmp_path / "trace.jsonl"
    ckpt = root / "tiny" / "ilkd" / "checkpoints-mla" / "last.ckpt"
    proc = launch(ilkd_args(data, root, trace), tmp_path)
    try:
        def trained_a_few_steps():
            runs = trace_runs(read_trace(trace)) if trace.is_file() else []
            done = [r for r in runs[0] if r["event"] == "step"] if runs else []
            return runs[0][0] if len(done) >= 3 and ckpt.exists() else None

        first = slurm.wait(trained_a_few_steps, 150, "the job to train 3 steps and checkpoint")
        # a one-job sweep is a plain job; several are the tasks of an array (<array id>_<task>)
        job = f"{first['slurm_array_job_id']}_{first['slurm_array_task_id']}" if "slurm_array_job_id" in first \
            else first["slurm_job_id"]
        assert first["global_step"] == 0 and first["ckpt_path"] is None and "slurm_restart_count" not in first
        interrupt(job)
        requeued = slurm.wait(lambda: slurm.job(job).get("Restarts") == "1" and slurm.job(job), 60,
                              f"job {job} to be requeued")
        assert requeued["JobId"] == first["slurm_job_id"]  # the same job, not a new submission
        out = finish(proc, tmp_path, 240, slurm)
    finally:
        if proc.poll() is None:
            proc.kill()
    runs = trace_runs(read_trace(trace))
    assert len(runs) == 2, f"expected the job to start twice\n{out[-3000:]}\n{job_logs(tmp_path)}"
    before, after = runs
    resumed = after[0]
    assert resumed["slurm_job_id"] == first["slurm_job_id"] and resumed["slurm_restart_count"] == "1"
    # resumed from the checkpoint of the first attempt, in the same directory
    steps_before = [r["step"] for r in before if r["event"] == "step"]
    steps_after = [r["step"] for r in after if r["event"] == "step"]
    assert resumed["ckpt_path"] == str(ckpt)
    assert 0 < resumed["global_step"] <= steps_before[-1] + 1
    assert steps_after == list(range(resumed["global_step"], MAX_STEPS))
    assert after[-1] == {**after[-1], "event": "end", "global_step": MAX_STEPS}
    report = json.loads((root / "tiny" / "ilkd" / "report.json").read_text())
    assert report["steps"] == MAX_STEPS
    assert (root / "tiny" / "ilkd" / "mla" / "model" / "config.json").is_file()
    assert slurm.job(first["slurm_job_id"]).get("JobState") == "COMPLETED"


def test_signalled_job_is_requeued_and_resumes(slurm, tmp_path):
    # USR2 to the job's steps: what sbatch --signal=USR2@<signal_delay_s> sends before the time limit, and what
    # submitit expects on preemption. Its handler (rank 0) resubmits the Hydra job with ckpt_path=last and
    # runs `scontrol requeue`.
    interrupt_and_check_resume(slurm, tmp_path, lambda job: slurm.run("scancel", "--signal=USR2", job))


def test_job_requeued_by_slurm_resumes(slurm, tmp_path):
    # Slurm itself requeues (preemption in REQUEUE mode, node failure): no submitit handler runs; the restarted
    # job sees SLURM_RESTART_COUNT=1 and its launcher adds ckpt_path=last.
    interrupt_and_check_resume(slurm, tmp_path, lambda job: slurm.run("scontrol", "requeue", job))
