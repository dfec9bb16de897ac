"""The project's Hydra config (the installed `zebra.conf`) composed with overrides, as train.py composes it."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from zebra.launch.resolvers import register_resolvers
from zebra.utils.paths import config_dir

register_resolvers()


def compose_cfg(overrides: list[str], return_hydra_config: bool = False):
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)
