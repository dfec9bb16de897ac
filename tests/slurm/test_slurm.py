"""On a real single-node Slurm (tests/slurm/conftest.py), through Hydra's submitit launcher
(`hydra/launcher=submitit_slurm`, zebra's launcher class):

(a) a two-job multirun sweep completes and each job writes its artifacts into its own deterministic directory;
(b) a running job requeued by Slurm itself (`scontrol requeue`) and then sent submitit's preemption / time-out
    signal (USR2, the requeue owner's signal; not scancel, which ends a job for good) is requeued each time (same
    job id, restart count 1 then 2) and resumes from its last checkpoint in the same directory, carrying the step
    count on to the end.

Without accounting submitit cannot see a job that died: every wait below has a timeout, and the launcher process
is killed if it outlives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import TRAIN, subprocess_env, tiny_data, trace_runs

pytestmark = pytest.mark.slurm

MAX_STEPS = 9


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
            # each step lasts >= 1 s, so the job is still running when it is interrupted
            "+callbacks.slow._target_=zebra.launch.trainer.Throttle", "+callbacks.slow.seconds=1.0"]


def steps_of(run: list[dict]) -> list[int]:
    return [r["step"] for r in run if r["event"] == "step"]


@pytest.mark.slow
def test_requeued_job_resumes_from_its_checkpoint(slurm, tmp_path):
    """One job, interrupted twice while it trains:

    1. `scontrol requeue`: Slurm requeues it by itself (as a preemption in REQUEUE mode or a node failure would); no
       submitit handler runs, the restarted job sees SLURM_RESTART_COUNT=1 and zebra's launcher adds ckpt_path=last;
    2. USR2 to its steps: submitit's signal (what sbatch --signal=USR2@<signal_delay_s> sends before the time limit,
       and what preemption sends on clusters that signal it); submitit's handler on rank 0 resubmits the same Hydra
       job with ckpt_path=last and runs `scontrol requeue`.

    Each time: the same job id, the restart count up by one, and the next attempt resumes from the last checkpoint
    in the same directory and carries the step count on to the end.
    """
    data = tiny_data(tmp_path / "data")
    root, trace = tmp_path / "artifacts", tmp_path / "trace.jsonl"
    ckpt = root / "tiny" / "ilkd" / "checkpoints-mla" / "last.ckpt"
    proc = launch(ilkd_args(data, root, trace), tmp_path)

    def attempt_trained(n: int, steps: int):
        """The start record of attempt n once it has trained `steps` steps and saved a checkpoint after them."""
        def check():
            runs = trace_runs(trace)
            if len(runs) <= n or len(steps_of(runs[n])) < steps or not ckpt.exists():
                return None
            return runs[n][0]
        return check

    try:
        first = slurm.wait(attempt_trained(0, 2), 150, "the job to train 2 steps")
        # a one-job sweep is a plain job; several are the tasks of an array (<array id>_<task>)
        job = f"{first['slurm_array_job_id']}_{first['slurm_array_task_id']}" if "slurm_array_job_id" in first \
            else first["slurm_job_id"]
        assert first["global_step"] == 0 and first["ckpt_path"] is None and "slurm_restart_count" not in first

        slurm.run("scontrol", "requeue", job)
        second = slurm.wait(attempt_trained(1, 2), 150, "the first requeued attempt to train 2 steps")
        slurm.run("scancel", "--signal=USR2", job)
        third = slurm.wait(attempt_trained(2, 0), 150, "the second requeued attempt to start")
        out = finish(proc, tmp_path, 180, slurm)
    finally:
        if proc.poll() is None:
            proc.kill()
    # the result reaches the launcher while Slurm may still be COMPLETING the job
    info = slurm.wait(lambda: slurm.job(job).get("JobState") == "COMPLETED" and slurm.job(job), 30,
                      f"job {job} to complete")
    assert info["Restarts"] == "2", info

    runs = trace_runs(trace)
    assert len(runs) == 3, f"expected three attempts\n{out[-3000:]}\n{job_logs(tmp_path)}"
    for n, (attempt, before) in enumerate(zip((second, third), runs[:2]), start=1):
        assert attempt["slurm_job_id"] == first["slurm_job_id"], "requeued, not resubmitted as a new job"
        assert attempt["slurm_restart_count"] == str(n)
        assert attempt["ckpt_path"] == str(ckpt), f"attempt {n} did not resume from the stage's last.ckpt"
        # resumed where the previous attempt's last checkpoint was: after at least one of its steps
        assert before[0]["global_step"] < attempt["global_step"] <= steps_of(before)[-1] + 1
    assert third["global_step"] > second["global_step"]
    for attempt_records in runs[1:]:
        steps = steps_of(attempt_records)
        assert steps == list(range(attempt_records[0]["global_step"], steps[-1] + 1))
    assert steps_of(runs[2])[-1] == MAX_STEPS - 1 and runs[2][-1]["event"] == "end"
    assert runs[2][-1]["global_step"] == MAX_STEPS
    # the same directories throughout; the stage finished and exported there
    report = json.loads((root / "tiny" / "ilkd" / "report.json").read_text())
    assert report["steps"] == MAX_STEPS
    assert (root / "tiny" / "ilkd" / "mla" / "model" / "config.json").is_file()
