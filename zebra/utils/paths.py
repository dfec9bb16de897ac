"""Where zebra's configs are, in a checkout and in an installed package alike."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def config_dir() -> Path:
    """The directory of the Hydra config groups: the installed `zebra.conf` package (pyproject.toml maps the
    repository's `conf/` onto it), else the checkout's `conf/` beside the package."""
    spec = importlib.util.find_spec("zebra.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    raise FileNotFoundError("zebra's configs were not found: install the package (pip install -e .) or run "
                            "from a checkout that has conf/")


def model_preset_file(name: str) -> Path:
    return config_dir() / "model" / f"{name}.yaml"
