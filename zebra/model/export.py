"""Hugging Face exports that load anywhere: the model code carried for trust_remote_code, written atomically.

`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works in a process that never
imported zebra, because the export carries zebra/model's files and an `auto_map`; once zebra is
imported, the registered Auto classes load it without trust_remote_code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from zebra.utils.files import atomic_dir

MODEL_DIR = Path(__file__).resolve().parent
# Every file ZebraForCausalLM needs; they import each other relatively, which transformers' remote-code
# loader follows.
MODEL_FILES = ("configuration_zebra.py", "modeling_zebra.py", "cache.py", "mla.py", "rope.py", "mamba2.py",
               "ssd.py", "packing.py", "flash_decode.py", "fused_conv_step.py", "fused_mlp.py", "fused_norm.py",
               "fused_state_update.py", "triton_util.py")
AUTO_MAP = {
    "AutoConfig": "configuration_zebra.ZebraConfig",
    "AutoModelForCausalLM": "modeling_zebra.ZebraForCausalLM",
}


def add_remote_code(export_dir: str | Path) -> None:
    """Copy the model's source files into `export_dir` and point config.json's auto_map at them."""
    export_dir = Path(export_dir)
    for name in MODEL_FILES:
        shutil.copy2(MODEL_DIR / name, export_dir / name)
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
