"""The model presets of `conf/model/*.yaml`, read directly (no Hydra composition): their architecture numbers
let describe, benchmarks and random teachers build real shapes without a download."""

from __future__ import annotations

from pathlib import Path

from zebra.utils.paths import config_dir

CONF_DIR = config_dir()


def preset(name: str):
    """The `conf/model/<name>.yaml` preset as an OmegaConf node; a clear error naming the choices."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise FileNotFoundError(f"no model preset {name!r} (conf/model/{name}.yaml); choose one of {choices}")
    return OmegaConf.load(path)


def preset_base(name: str) -> dict:
    """The `base` block (Llama architecture numbers) of a preset, as a plain dict."""
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(preset(name).base, resolve=False))


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
