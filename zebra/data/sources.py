"""Data sources: where raw examples come from and how their fields map to conversations.

A source is a dict, as written in `conf/data/*.yaml`:

    {"path": "data/chat.jsonl"}                         # local json / jsonl / parquet / txt file
    {"path": "corpus/"}  {"path": "corpus/**/*.jsonl"}    # every data file of a folder, or a glob (local_files.py)
    {"path": "saved/"}                                   # a save_to_disk dataset (its `split` of a DatasetDict)
    {"path": "shipped:sft"}                              # a file shipped in zebra/data/shipped/
    {"name": "org/dataset", "config": None, "split": "train", "revision": None}   # a hub dataset
  plus one field mapping (default: messages_field="messages"):
    messages_field: list of {"role", "content"} (ShareGPT {"from", "value"} is accepted too)
    prompt_field + response_field (+ system_field): a single-turn exchange
    text_field: plain text, no chat template (.txt files: always; `sample_by` line | paragraph | document
      says what one document is, default paragraph: blank-line separated)
  plus `weight` (token share in the mixture, default 1).

Everything that can be wrong with a source is reported when it is loaded, naming the source.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from . import local_files

SHIPPED_DIR = Path(__file__).parent / "shipped"
SHIPPED_PREFIX = "shipped:"
LOCAL_BUILDERS = local_files.BUILDERS
# ShareGPT speaker names -> OpenAI roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

_SPEC_KEYS = {
    "path", "name", "config", "split", "revision", "weight",
    "messages_field", "prompt_field", "response_field", "system_field", "text_field",
    "chosen_field", "rejected_field", "sample_by",
}  # fmt: skip


def shipped_path(name: str) -> Path:
    """A file shipped with zebra: 'sft', 'preferences', 'heldout' (or a full file name)."""
    candidates = [SHIPPED_DIR / name] + [SHIPPED_DIR / f"{name}{ext}" for ext in (".jsonl", ".txt")]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no shipped data file {name!r} in {SHIPPED_DIR}")


def _offline() -> bool:
    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


@dataclass
class Source:
    """One validated source spec; `kind` is 'chat', 'text' or 'preference'."""

    spec: dict
    kind: str
    weight: float = 1.0
    path: Path | None = None
    fields: dict = field(default_factory=dict)
    files: list[Path] | None = None  # the data files of a local path; None for a save_to_disk dataset
    _identity: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_spec(cls, spec: dict | str, kind: str = "chat") -> "Source":
        if isinstance(spec, str):  # a bare string: a local path if it looks like one, else a hub name
            local = (spec.startswith(SHIPPED_PREFIX) or Path(spec).suffix in LOCAL_BUILDERS
                     or local_files.is_glob(spec) or Path(spec).exists())
            spec = {"path": spec} if local else {"name": spec}
        spec = dict(spec)
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"data source {spec} has unknown keys {sorted(unknown)}; known: {sorted(_SPEC_KEYS)}")
        if ("path" in spec) == ("name" in spec):
            raise ValueError(f"data source {spec} needs exactly one of 'path' (local file) or 'name' (hub dataset)")
        weight = float(spec.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"data source {spec} has weight {weight}; weights must be > 0")
        path = files = None
        if "path" in spec:
            p = str(spec["path"])
            path = shipped_path(p[len(SHIPPED_PREFIX):]) if p.startswith(SHIPPED_PREFIX) else Path(p).expanduser()
            if not local_files.is_saved_dataset(path):
                files = local_files.resolve_files(path)
        if files is not None and local_files.builder_of(files) == "text":
            if kind == "preference" or set(spec) & {"messages_field", "prompt_field", "response_field"}:
                raise ValueError(f"data source {spec}: .txt files hold plain text; they take no chat fields")
            spec.setdefault("text_field", "text")
            if spec["text_field"] != "text":
                raise ValueError(f"data source {spec}: the text of a .txt file is its field 'text'")
            spec.setdefault("sample_by", "paragraph")
            if spec["sample_by"] not in local_files.TEXT_SAMPLE_BY:
                raise ValueError(f"data source {spec}: sample_by must be one of {local_files.TEXT_SAMPLE_BY}")
        elif "sample_by" in spec:
            raise ValueError(f"data source {spec}: sample_by applies to .txt files only")
        fields = _field_mapping(spec, kind)
        if kind == "chat" and "text" in fields:
            kind = "text"
        return cls(spec, kind, weight, path, fields, files)

    @property
    def description(self) -> str:
        return str(self.path) if self.path is not None else f"hub dataset {self.spec['name']!r}"

    @property
    def split(self) -> str:
        return self.spec.get("split", "train")

    def identity(self) -> str:
        """Hash of what the raw data is: names its caches and seeds its split.

        The spec without weight (which only affects mixing) and, for local files, their content rather than
        their path, so the same file reached by another path keeps its cache and split. Computed once per
        Source (hashing a big local file is not free).
        """
        if self._identity is not None:
            return self._identity
        spec = {k: v for k, v in self.spec.items() if k not in ("weight", "path")}
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        h.update(json.dumps([self.kind, self.fields], sort_keys=True).encode())
        if self.path is not None:
            h.update(_file_fingerprint(self.files or [self.path]).encode())
        self._identity = h.hexdigest()[:16]
        return self._identity

    def load(self, cache_dir: str | os.PathLike | None = None) -> datasets.Dataset:
        """The raw examples as a `datasets.Dataset`, with its fields checked."""
        if self.path is not None:
            ds = self._load_local(cache_dir)
        else:
            ds = self._load_hub()
        if len(ds) == 0:
            raise ValueError(f"data source {self.description} (split {self.split!r}) is empty")
        optional = {self.fields["prompt"]} if self.kind == "preference" and "prompt_field" not in self.spec else set()
        missing = [f for f in self.fields.values() if f not in ds.column_names and f not in optional]
        if missing:
            raise ValueError(
                f"data source {self.description} has no field(s) {missing}; its fields are {ds.column_names}"
            )
        # records without a field read as null (json: a key absent from some lines), which would train as "None"
        nulls = [f for f in self.fields.values() if f in ds.column_names and f not in optional
                 and ds.data.column(f).null_count]
        if nulls:
            where = local_files.find_missing_field(self.files, nulls) if self.files else None
            raise ValueError(f"data source {self.description}: "
                             + (where or f"field(s) {nulls} missing or null in some records"))
        return ds

    def _load_local(self, cache_dir) -> datasets.Dataset:
        if self.files is None:
            ds = datasets.load_from_disk(str(self.path))
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise ValueError(f"data source {self.path} has no split {self.split!r}; its splits: {list(ds)}")
                ds = ds[self.split]
            return ds
        # datasets reports empty files obscurely (a bare StopIteration for json), so look first
        local_files.check_not_empty(self.files)
        builder = local_files.builder_of(self.files)
        options = {"sample_by": self.spec["sample_by"]} if builder == "text" else {}
        try:
            return datasets.load_dataset(builder, data_files=[str(f) for f in self.files],
                                         split=self.spec.get("split", "train"), cache_dir=cache_dir, **options)
        except Exception as e:  # malformed json, bad split expression...
            where = local_files.find_malformed(self.files)
            if where is not None:
                raise ValueError(f"data source {self.description}: {where}") from e
            raise ValueError(f"could not read data source {self.description}: {type(e).__name__}: {e}") from e

    def _load_hub(self) -> datasets.Dataset:
        name = self.spec["name"]
        try:
            return datasets.load_dataset(
                name, self.spec.get("config"), split=self.split, revision=self.spec.get("revision")
            )
        except (ConnectionError, OSError) as e:
            why = (
                "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and it is not in the local cache"
                if _offline()
                else "no network or no access to the Hugging Face hub, and it is not in the local cache"
            )
            raise ConnectionError(f"the dataset {name!r} could not be reached: {why} ({e})") from e

    def examples_to_conversations(self, batch: dict) -> list:
        """A batch of raw examples (column dict) -> list of conversations (or texts for text sources)."""
        f = self.fields
        n = len(next(iter(batch.values())))
        if self.kind == "text":
            return [str(t) for t in batch[f["text"]]]
        if "messages" in f:
            return [normalise_messages(m, self.description) for m in batch[f["messages"]]]
        out = []
        for i in range(n):
            system = batch[f["system"]][i] if "system" in f else None
            msgs = [{"role": "system", "content": str(system)}] if system else []
            msgs += [
                {"role": "user", "content": str(batch[f["prompt"]][i])},
                {"role": "assistant", "content": str(batch[f["response"]][i])},
            ]
            out.append(msgs)
        return out


def _field_mapping(spec: dict, kind: str) -> dict:
    """Which dataset column plays which part, checked for a consistent combination."""
    if kind == "preference":
        out = {
            "prompt": spec.get("prompt_field", "prompt"),
            "chosen": spec.get("chosen_field", "chosen"),
            "rejected": spec.get("rejected_field", "rejected"),
        }
        if "system_field" in spec:  # e.g. Orca DPO pairs: a system prompt column
            out["system"] = spec["system_field"]
        return out
    given = [k for k in ("messages_field", "prompt_field", "response_field", "text_field") if k in spec]
    if "text_field" in spec:
        if len(given) > 1:
            raise ValueError(f"data source {spec}: text_field cannot be combined with {given}")
        return {"text": spec["text_field"]}
    if "prompt_field" in spec or "response_field" in spec:
        if "messages_field" in spec or not ("prompt_field" in spec and "response_field" in spec):
            raise ValueError(f"data source {spec}: give both prompt_field and response_field (and no messages_field)")
        out = {"prompt": spec["prompt_field"], "response": spec["response_field"]}
        if "system_field" in spec:
            out["system"] = spec["system_field"]
        return out
    return {"messages": spec.get("messages_field", "messages")}


def normalise_messages(messages, where: str = "data") -> list[dict]:
    """OpenAI-style [{"role", "content"}]; ShareGPT [{"from", "value"}] is mapped to it."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: a conversation must be a non-empty list of messages, got {messages!r:.200}")
    out = []
    for m in messages:
        if isinstance(m, dict) and "role" in m and "content" in m:
            role, content = m["role"], m["content"]
        elif isinstance(m, dict) and "from" in m and "value" in m:
            role, content = SHAREGPT_ROLES.get(m["from"], m["from"]), m["value"]
        else:
            raise ValueError(f"{where}: a message needs 'role' and 'content', got {m!r:.200}")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: unknown role {role!r} (expected system, user or assistant)")
        out.append({"role": role, "content": "" if content is None else str(content)})
    return out


def as_spec_list(specs, default) -> list:
    """None -> default; one spec (dict, str) -> [spec]; Hydra DictConfig / ListConfig -> plain containers."""
    if specs is None:
        specs = default
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(specs, (DictConfig, ListConfig)):
            specs = OmegaConf.to_container(specs, resolve=True)
    except ImportError:
        pass
    if isinstance(specs, (dict, str)):
        specs = [specs]
    return [s if isinstance(s, str) else dict(s) for s in specs]


def _file_fingerprint(paths: list[Path]) -> str:
    """Content hash for files up to 256 MB; size + mtime for bigger ones (hashing them each start is slow)."""
    files = [f for p in paths for f in (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])]
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        if st.st_size <= 256 * 2**20:
            h.update(hashlib.sha256(p.read_bytes()).digest())
        else:
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()
