"""Stale build locks of JIT-compiled torch extensions.

DeepSpeed compiles some of its ops on first use (on CPU processes, its shared-memory communication op as the
process group starts; on GPUs, optimizer ops) into torch's extension directory, holding a `lock` file there while
it builds. A run killed in the middle of such a build (a timeout, a preemption, Ctrl-C twice) leaves the lock
behind, and every later build of the same op waits for it to disappear: forever, printing nothing. Seen here: all
DeepSpeed runs of a test session hung at start after a timed-out run. Builds take seconds to a few minutes, so a
lock much older than that is refused up front, by name, before any training starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STALE_AFTER_S = 900  # far longer than any op build seen here (DeepSpeed's shm op: ~1 min on 2 cores)


def extensions_root() -> Path:
    """torch's JIT build root: TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions (as torch.utils.cpp_extension)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "torch_extensions"


def stale_build_locks(root: Path | None = None, older_than_s: float = STALE_AFTER_S,
                      now: float | None = None) -> list[Path]:
    """Lock files under <root>/<python-and-device>/<op>/lock (or <root>/<op>/lock) older than `older_than_s`."""
    root = extensions_root() if root is None else Path(root)
    now = time.time() if now is None else now
    found = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            if now - lock.stat().st_mtime > older_than_s:
                found.append(lock)
        except OSError:  # removed meanwhile: its build finished
            continue
    return sorted(found)


def check_build_locks(root: Path | None = None, older_than_s: float = STALE_AFTER_S) -> None:
    locks = stale_build_locks(root, older_than_s)
    if locks:
        listed = ", ".join(str(p) for p in locks)
        raise RuntimeError(
            f"stale torch extension build lock(s), older than {older_than_s / 60:.0f} min: {listed}. A run was killed "
            "while it compiled a DeepSpeed op, and every later build of that op would wait on the lock forever. "
            "If no other process on this machine is building it, delete the lock file(s) and run again.")
