"""Files written whole or not at all: a crash never leaves a half-written export or report behind.

What is written here gets the permissions the user's umask allows (as `open` and `mkdir` give), not tempfile's
owner-only 700 / 600: exports and reports on a cluster filesystem are shared with a team.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

TMP_TAG, OLD_TAG = ".tmp-", ".old-"  # `.<name>.tmp-*`: being written; `.<name>.old-*`: being replaced


def umask() -> int:
    """This process's umask, read without changing it where Linux reports it (os.umask(0) would, for an instant,
    make files other threads create world-writable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask_allows(path: str | Path) -> None:
    """Give `path` (a file, or a directory and everything under it) the modes a plain `mkdir` / `open` would have:
    directories and executables 777, other files 666, less the umask. Links are left alone."""
    path, mask = Path(path), umask()
    paths = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o111
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove what an earlier process killed while writing `target` left beside it (`.<name>.tmp-*`,
    `.<name>.old-*`). One process writes a given target at a time (rank 0), so none of these is still in use."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    stale = [p for p in target.parent.iterdir()
             if p.name.startswith(f".{target.name}{TMP_TAG}") or p.name.startswith(f".{target.name}{OLD_TAG}")]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


@contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary directory next to `target`; on success it replaces `target` in one rename.

    On an exception the temporary directory is removed and an existing `target` is left untouched, so a
    crash never leaves a half-written export behind; what a killed process left (SIGKILL runs no cleanup) is
    removed by the next write of the same target.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}", dir=target.parent))
    try:
        yield tmp
        share_as_umask_allows(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}{OLD_TAG}{os.getpid()}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        share_as_umask_allows(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
