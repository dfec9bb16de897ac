"""OmegaConf resolvers the configs use; registered by train.py and by tests before composing."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from zebra.launch import launch_stamp


def _join(items, sep: str = "-") -> str:
    """`${join:${mix.mla_layers}}` -> "0-7-15" (used in directory names)."""
    if items is None:
        return "none"
    if isinstance(items, (str, int)):
        return str(items)
    return sep.join(str(i) for i in items)


def _wandb_offline() -> bool:
    """wandb runs offline unless an API key is configured, so the default never touches the network."""
    return not os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "") in ("offline", "disabled")


def register_resolvers() -> None:
    for name, fn in (("join", _join), ("cwd", lambda: os.getcwd()), ("wandb_offline", _wandb_offline)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("launch_stamp"):  # cached like Hydra's `now`: one value per run
        OmegaConf.register_new_resolver("launch_stamp", launch_stamp, use_cache=True)
