"""The Zebra hybrid model: plain PyTorch + transformers (no Lightning, Hydra or DeepSpeed)."""

from .cache import HybridCache
from .configuration_zebra import ZebraConfig
from .modeling_zebra import ZebraForCausalLM, ZebraModel

__all__ = ["HybridCache", "ZebraConfig", "ZebraForCausalLM", "ZebraModel"]
