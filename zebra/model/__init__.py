"""The Zebra hybrid model: plain PyTorch + transformers (no Lightning, Hydra or DeepSpeed)."""

from .configuration_zebra import ZebraConfig

__all__ = ["ZebraConfig"]
