"""Hugging Face exports that load anywhere: the model code carried for trust_remote_code, written atomically.

`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works in a process that never
imported zebra, because the export carries zebra/model's files and an `auto_map`; once zebra is
imported, the registered Auto classes load it without trust_remote_code. The tokenizer is a transformers class
(no auto_map in tokenizer_config.json), so AutoTokenizer needs no remote code; without trust_remote_code,
transformers still asks interactively (15 s, then no) whether to run config.json's code, as for any repository
with custom code, and loads the tokenizer either way. Files and folders get the modes the umask allows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from zebra.utils.files import atomic_dir

MODEL_DIR = Path(__file__).resolve().parent
OPS_DIR = MODEL_DIR / "ops"
NOT_EXPORTED = ("__init__.py", "export.py")  # the package's own imports, and this file (it imports zebra)
AUTO_MAP = {
    "AutoConfig": "configuration_zebra.ZebraConfig",
    "AutoModelForCausalLM": "modeling_zebra.ZebraForCausalLM",
}


def model_sources() -> dict[str, str]:
    """{file name: source} of what ZebraForCausalLM needs, flat: zebra/model's modules and zebra/model/ops's
    kernels side by side. transformers' remote-code loader follows only `from .x import` to x.py in the same
    folder, so a module's `from .ops.x import` becomes `from .x import`, as does a kernel's `from ..x import`."""
    to_flat = {MODEL_DIR: re.compile(r"^(\s*from\s+)\.ops\.", re.M), OPS_DIR: re.compile(r"^(\s*from\s+)\.\.", re.M)}
    sources = {}
    for folder, flatten in to_flat.items():
        for path in sorted(folder.glob("*.py")):
            if path.name in NOT_EXPORTED:
                continue
            if path.name in sources:
                raise ValueError(f"{path}: another exported file has this name, and the export is flat")
            sources[path.name] = flatten.sub(r"\1.", path.read_text())
    for name, text in sources.items():
        for target in re.findall(r"^\s*from\s+(\.\S*)\s+import", text, re.M):
            if not (re.fullmatch(r"\.\w+", target) and f"{target[1:]}.py" in sources):
                raise ValueError(f"{name}: `from {target} import` names no exported file (write `from .ops.x import`)")
    return sources


def add_remote_code(export_dir: str | Path) -> None:
    """Write the model's source files into `export_dir` and point config.json's auto_map at them."""
    export_dir = Path(export_dir)
    for name, text in model_sources().items():
        (export_dir / name).write_text(text)
    cfg_path = export_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = dict(AUTO_MAP)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_hf_model(model, directory: str | Path, tokenizer=None, model_card: str | None = None,
                   remote_code: bool = True) -> None:
    """Save `model` (+ tokenizer, model card, and for a zebra model its code) into `directory` (not atomic)."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if remote_code and getattr(model.config, "model_type", None) == "zebra":
        add_remote_code(directory)
    if model_card is not None:
        (directory / "README.md").write_text(model_card)


def save_hf_model(model, out_dir: str | Path, tokenizer=None, model_card: str | None = None,
                  remote_code: bool = True) -> Path:
    """`write_hf_model`, atomically: `out_dir` is complete or untouched. Returns the path."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_hf_model(model, tmp, tokenizer, model_card, remote_code)
    return out_dir
