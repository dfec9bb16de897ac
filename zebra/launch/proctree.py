"""Ending a launch with everything it started.

torchrun starts its workers in sessions of their own, so killing the launcher, or its process group, leaves the
workers running (holding GPUs, or a torch-extension build lock; seen on the lent GPU machine and in this project's
CI). `kill_tree` finds every descendant from /proc first, then kills them and the launcher.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its descendants and the process groups they lead; then reap `proc`."""
    for pid in [*descendants(proc.pid), proc.pid]:  # collected first: orphans are re-parented once a parent dies
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()
