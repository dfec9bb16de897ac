"""Tokenised-data cache: `datasets` directories keyed by a hash, read back zero-copy.

Tokenising is the slow part of data preparation (hours for billions of tokens), so its result is saved
with `Dataset.save_to_disk` under `<cache_dir>/<kind>/<key>`, where the key hashes everything that
changes token ids (the source's content, the tokenizer's vocabulary/template, the chat template
choice). Packing, splitting and mixing are cheap numpy over document lengths and are recomputed on every
start, so changing seq_len, seed or weights does not re-tokenise.

Writes go to a temporary directory renamed into place, so concurrent ranks never read half a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np

CACHE_FORMAT = 1  # bump when the stored columns change meaning


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps([CACHE_FORMAT, obj], sort_keys=True, default=str).encode()).hexdigest()[:20]


def is_cached(target: Path) -> bool:
    return (Path(target) / "state.json").is_file()


def build_cached(target: Path, build: Callable[[Path], datasets.Dataset]) -> None:
    """Run `build(scratch_dir)` and save its dataset at `target`, unless `target` already exists."""
    target = Path(target)
    if is_cached(target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        build(scratch).save_to_disk(str(scratch / "out"))
        try:
            os.rename(scratch / "out", target)
        except OSError:
            if not is_cached(target):  # not a lost race with another rank: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _ListColumn:
    """A list<int> column as numpy views of its Arrow chunks (memory-mapped, no copy)."""

    def __init__(self, chunked):
        self.values, self.offsets, starts = [], [], [0]
        for chunk in chunked.chunks:
            self.values.append(chunk.values.to_numpy(zero_copy_only=True))
            # offsets of a sliced chunk index the unsliced values buffer, which is what `values` is
            self.offsets.append(np.asarray(chunk.offsets))
            starts.append(starts[-1] + len(chunk))
        self.starts = np.asarray(starts, dtype=np.int64)

    def lengths(self) -> np.ndarray:
        if not self.offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(o).astype(np.int64) for o in self.offsets])

    def get(self, j: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, j, side="right")) - 1
        o = self.offsets[c]
        i = j - self.starts[c]
        return self.values[c][o[i] : o[i + 1]]


class DocStore:
    """Tokenised documents of one cached directory: `lengths`, and `column(name, j)` as numpy arrays.

    Pickles as its path, so DataLoader workers (fork or spawn) re-open the memory map instead of
    copying the data.
    """

    def __init__(self, path: str | os.PathLike, columns: tuple[str, ...]):
        self.path, self.columns = str(path), tuple(columns)
        self._cols: dict[str, _ListColumn] | None = None
        self.lengths = self._open()[self.columns[0]].lengths()

    def _open(self) -> dict[str, _ListColumn]:
        if self._cols is None:
            table = datasets.load_from_disk(self.path).data.table
            self._cols = {c: _ListColumn(table.column(c)) for c in self.columns}
        return self._cols

    def column(self, name: str, j: int) -> np.ndarray:
        return self._open()[name].get(int(j))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self):
        return {"path": self.path, "columns": self.columns, "lengths": self.lengths, "_cols": None}
