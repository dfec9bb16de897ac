"""Local data files: which files a source's `path` names, and what is wrong with them when they cannot be read.

A `path` is one file, a folder (every data file under it, or a `save_to_disk` dataset) or a glob
(`corpus/*.jsonl`, `books/**/*.txt`). Formats: json / jsonl (one object per line, or one array), parquet, txt.
The files are read with `datasets` into its Arrow cache, memory-mapped, so a corpus larger than memory is fine.
Reading a good corpus costs no extra pass; only when `datasets` fails (or a field is missing) are the files
scanned again to name the file and line at fault.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from zebra.errors import DataError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
TEXT_SAMPLE_BY = ("line", "paragraph", "document")  # what one document of a .txt file is
_GLOB_CHARS = set("*?[")
_DATASET_DIR_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in str(path))


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / m).is_file() for m in _DATASET_DIR_MARKERS)


def resolve_files(path: str | Path) -> list[Path]:
    """The data files a path names (sorted), checked: they exist, have a known extension and one format."""
    text = str(path)
    if is_glob(text):
        files = sorted(Path(p) for p in glob.glob(str(Path(text).expanduser()), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"no data files match {text!r}")
    else:
        p = Path(text).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"data file not found: {p}")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in BUILDERS
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not files:
                raise DataError(f"data folder {p} has no data files ({', '.join(sorted(BUILDERS))})")
        else:
            files = [p]
    bad = [f for f in files if f.suffix not in BUILDERS]
    if bad:
        raise DataError(f"data file {bad[0]} has an unsupported extension; use one of {sorted(BUILDERS)}")
    builders = {BUILDERS[f.suffix] for f in files}
    if len(builders) > 1:
        raise DataError(f"data path {text!r} mixes formats {sorted(builders)}; give each format its own source")
    return files


def builder_of(files: list[Path]) -> str:
    return BUILDERS[files[0].suffix]


def check_not_empty(files: list[Path]) -> None:
    """Every file holds at least one record (`datasets` reports an empty json file as a bare StopIteration)."""
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            empty = pq.read_metadata(f).num_rows == 0
        else:
            empty = _blank(f)
        if empty:
            raise DataError(f"data file {f} is empty")


def _blank(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _records(path: Path):
    """(line number, parsed object or the JSONDecodeError) for each non-blank line of a json-lines file, or the
    one document of a json file that is not json-lines."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.read(1 << 16).lstrip()
    if path.suffix == ".json" and first[:1] == "[":  # one array of records
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except json.JSONDecodeError as e:
            yield e.lineno, e
            return
        for i, row in enumerate(rows if isinstance(rows, list) else [rows]):
            yield f"record {i}", row
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, e


def _where(path: Path, at) -> str:
    return f"{path}:{at}" if isinstance(at, int) else f"{path} ({at})"


def find_malformed(files: list[Path]) -> str | None:
    """`file:line: what is wrong` for the first json record that is not a JSON object, else None."""
    for f in files:
        if BUILDERS[f.suffix] != "json":
            continue
        for at, row in _records(f):
            if isinstance(row, json.JSONDecodeError):
                return f"{_where(f, at)}: malformed JSON ({row.msg}, column {row.colno})"
            if not isinstance(row, dict):
                return f"{_where(f, at)}: expected a JSON object, got {type(row).__name__}"
    return None


def find_missing_field(files: list[Path], fields: list[str]) -> str | None:
    """`file:line: ...` for the first json record (or parquet row) without one of `fields` (or with it null)."""
    for f in files:
        builder = BUILDERS[f.suffix]
        if builder == "json":
            for at, row in _records(f):
                if isinstance(row, dict):
                    missing = [k for k in fields if row.get(k) is None]
                    if missing:
                        return f"{_where(f, at)}: no field(s) {missing}; this record has {sorted(row)}"
        elif builder == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(f, columns=[k for k in fields if k in pq.read_schema(f).names])
            for k in fields:
                if k not in table.column_names:
                    return f"{f}: no column {k!r}"
                col = table.column(k)
                if col.null_count:
                    row = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
                    return f"{f} (row {row}): field {k!r} is null"
    return None
