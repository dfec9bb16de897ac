"""The GPU recipe's driver (experiments/deepspeed_scaling) on CPU: a launch cut short must take its whole process tree
with it (torchrun starts its workers in sessions of their own, which outlived the driver's timeout on a GPU
machine), and a bad --parts is refused before any work."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def driver():
    spec = importlib.util.spec_from_file_location("scale_gpu", REPO / "experiments/deepspeed_scaling/scale_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_timeout_kills_workers_in_their_own_sessions(driver, tmp_path):
    pidfile = tmp_path / "worker.pid"
    # a "launcher" whose worker starts a session of its own, as torchrun's do
    script = f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    proc = driver.start([sys.executable, "-c", script], tmp_path / "log.txt")
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    worker = int(pidfile.read_text())
    assert alive(worker)
    assert driver.wait(proc, timeout=0.2) == "timeout"
    for _ in range(50):
        if not alive(worker):
            break
        time.sleep(0.05)
    assert not alive(worker), "the worker outlived its launcher's timeout"


def test_unknown_part_is_refused_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "experiments/deepspeed_scaling/scale_gpu.py"),
                          "--out", str(tmp_path / "r.json"), "--work", str(tmp_path / "w"), "--parts", "zebra8b,bogus"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "unknown ['bogus']" in out.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "r.json").exists()
