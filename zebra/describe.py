"""`stage=describe`: build the hybrid on the meta device and report its size and cache, downloading nothing."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zebra.mixes import layer_types_for, resolve_mla_layers, uniform_layers
from zebra.model import ZebraConfig, ZebraForCausalLM
from zebra.model.cache import measure_cache_bytes


def _plain(obj):
    """OmegaConf node -> plain Python containers (no-op for dicts)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a requirement
        pass
    return obj


def zebra_config_from_preset(model_cfg, layer_types: list[str]) -> ZebraConfig:
    """A ZebraConfig from a `conf/model` preset's `base` and `mla` blocks (architecture numbers, no download)."""
    base = dict(_plain(model_cfg["base"]))
    mla = dict(_plain(model_cfg["mla"]))
    return ZebraConfig(**base, **mla, layer_types=layer_types)


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def describe(cfg) -> dict:
    model_cfg, mix = cfg["model"], _plain(cfg["mix"])
    num_layers = int(model_cfg["base"]["num_hidden_layers"])
    smart_file = Path(cfg["paths"]["root"]) / model_cfg["name"] / "smart" / "sensitivity.json" \
        if "paths" in cfg else None
    placement = mix.get("selection", "explicit")
    if placement == "smart" and not (smart_file and smart_file.is_file()):
        # Size and cache depend only on how many layers are MLA, so describe works before SMART has run.
        mla_layers = uniform_layers(num_layers, mix.get("n_mla"))
        placement = "uniform (SMART output not found yet)"
    else:
        mla_layers = resolve_mla_layers(mix, num_layers, smart_file)
    config = zebra_config_from_preset(model_cfg, layer_types_for(num_layers, mla_layers))
    with torch.device("meta"):
        model = ZebraForCausalLM(config)
    cache = measure_cache_bytes(config, dtype=torch.bfloat16)
    return {
        "model": model_cfg["name"],
        "mix": mix.get("name"),
        "params": count_parameters(model),
        "kv_fraction": round(cache["kv_fraction"], 8),
        "cache_bytes_per_token": cache["cache_bytes_per_token"],
        "cache_constant_bytes": cache["cache_constant_bytes"],
        "base_kv_bytes_per_token": cache["base_kv_bytes_per_token"],
        "mla_layers": mla_layers,
        "placement": placement,
        "layer_types": config.layer_types,
    }


def print_description(cfg) -> dict:
    info = describe(cfg)
    print(json.dumps(info), flush=True)
    return info
