"""A real single-node Slurm for the `-m slurm` tests (DESIGN.md §6), started once per session and torn down after.

munged on its own socket, slurmctld and slurmd in the foreground (as root: tests run as root here and in CI), all
state, spool and logs under a temporary directory, free ports, no accounting. `.ci/install-slurm.sh` installs the
Debian packages; without them these tests fail (they never skip).

Facts the tests rely on (DESIGN §6): `AuthInfo=cred_expire=5` (a requeued job is held cred_expire + 1 s instead
of 121 s), `sched_interval=1` (a pending job starts within a second once it may), and without accounting
submitit cannot see a job that died, so every wait has a timeout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel", "srun")
INSTALL_HINT = "install them with `.ci/install-slurm.sh` (Debian slurm-wlm + munge; `.ci/run` does)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This machine as one node `localhost`, with its real CPU layout and memory (slurmd -C)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True, timeout=30).stdout
    line = next(x for x in out.splitlines() if x.startswith("NodeName="))
    parts = [p for p in line.split() if not p.startswith("NodeName=")]
    return " ".join(["NodeName=localhost", "NodeAddr=127.0.0.1", *parts, "State=UNKNOWN"])


@dataclass
class SlurmCluster:
    root: Path
    env: dict
    procs: dict = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}\n{self.logs()}")
        return proc.stdout

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict ({} once the job is gone)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        info = {}
        for token in out.split():
            key, _, value = token.partition("=")
            info.setdefault(key, value)
        return info

    def wait(self, condition, timeout: float, what: str, interval: float = 0.5):
        """Poll `condition()` until it returns something truthy; fail with the Slurm logs after `timeout`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = condition()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def logs(self, lines: int = 25) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(out)


def _stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.fail(f"Slurm/munge commands missing: {', '.join(missing)}; {INSTALL_HINT}", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the slurm tests start slurmd, which must run as root", pytrace=False)

    root = tmp_path_factory.mktemp("slurm")
    root.chmod(0o755)
    munge = root / "munge"
    for d in (munge, root / "state", root / "spool"):
        d.mkdir()
    munge.chmod(0o755)
    key, sock = munge / "munge.key", munge / "munge.socket.2"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30)
    key.chmod(0o600)

    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=zebratest",
        "SlurmctldHost=localhost",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={sock},cred_expire=5",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=1",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        "SlurmdTimeout=30",
        "SlurmctldTimeout=30",
        "InactiveLimit=0",
        "KillWait=5",
        "MinJobAge=600",
        "SlurmdParameters=config_overrides",
        _node_line(),
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = SlurmCluster(root, env)
    log = (root / "daemons.out").open("a")
    try:
        cluster.procs["munged"] = subprocess.Popen(
            ["munged", "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"], stdout=log, stderr=log)
        cluster.wait(lambda: sock.exists(), 20, "munged's socket")
        cluster.procs["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(conf)], env=env,
                                                      stdout=log, stderr=log)
        cluster.procs["slurmd"] = subprocess.Popen(["slurmd", "-D", "-f", str(conf), "-N", "localhost"], env=env,
                                                   stdout=log, stderr=log)

        def idle():
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}\n{cluster.logs()}")
            return cluster.run("sinfo", "-h", "-n", "localhost", "-o", "%t", check=False).strip() == "idle"

        cluster.wait(idle, 60, "node localhost to be idle")
        os.environ["SLURM_CONF"] = str(conf)  # for submitit's sbatch / scontrol in the processes tests start
        yield cluster
    finally:
        os.environ.pop("SLURM_CONF", None)
        if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--partition=debug"], env=env, capture_output=True, timeout=30)
            time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            if name in cluster.procs:
                _stop(cluster.procs[name])
        log.close()
