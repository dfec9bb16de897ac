"""A build lock left by a killed DeepSpeed op build is refused by name before training starts (it made every
later DeepSpeed run wait forever); a fresh lock (a build in progress elsewhere) is left alone."""

import os
import time

import pytest

from zebra.launch.build_locks import check_build_locks, extensions_root, stale_build_locks


def make_lock(root, op, age_s):
    lock = root / "py311_cpu" / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    t = time.time() - age_s
    os.utime(lock, (t, t))
    return lock


def test_old_lock_is_refused_by_name_and_a_fresh_one_is_not(tmp_path):
    old = make_lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    make_lock(tmp_path, "cpu_adam", age_s=30)
    assert stale_build_locks(tmp_path, older_than_s=900) == [old]
    with pytest.raises(RuntimeError, match="deepspeed_shm_comm/lock") as err:
        check_build_locks(tmp_path, older_than_s=900)
    assert "cpu_adam" not in str(err.value) and "delete the lock" in str(err.value)
    old.unlink()
    check_build_locks(tmp_path, older_than_s=900)  # nothing stale left


def test_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path
    make_lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    with pytest.raises(RuntimeError, match="stale torch extension build lock"):
        check_build_locks()


def test_strategy_refuses_before_any_build(tmp_path, monkeypatch):
    from zebra.launch.deepspeed import ZebraDeepSpeedStrategy

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    make_lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    strategy = ZebraDeepSpeedStrategy(stage=3)
    with pytest.raises(RuntimeError, match="deepspeed_shm_comm/lock"):
        strategy.setup_environment()
