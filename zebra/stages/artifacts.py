"""Stage artifacts: the config hash that says whether a stage's result is current, exports with their model card,
and reports."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig, OmegaConf

from zebra.model import export
from zebra.model.cache import measure_cache_bytes
from zebra.plan.describe import count_parameters
from zebra.stages import zero
from zebra.stages.export_check import compare_export, probe_reference

log = logging.getLogger("zebra.stages")


def to_container(cfg) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig,)) or OmegaConf.is_config(cfg) \
        else cfg


def config_hash(*parts) -> str:
    """Stable short hash of resolved config pieces (dicts, lists, scalars)."""
    blob = json.dumps([to_container(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _model_identity(cfg: DictConfig) -> dict:
    m = cfg.model
    return {"name": m.name, "teacher": m.teacher, "tokenizer": m.tokenizer, "base": m.base, "mla": m.mla}


def stage_hash(name: str, cfg: DictConfig) -> str:
    """Hash of everything a stage's result depends on, chained through the stages it reads from, so that
    `stage=pipeline` re-runs a stage when its own config or any upstream stage's changed."""
    sft = cfg.data.get("sft")
    if name == "ilkd":  # which students a run trains does not change either student's result
        ild = {k: v for k, v in to_container(cfg.ilkd).items() if k != "students"}
        return config_hash("ilkd", _model_identity(cfg), sft, ild, cfg.seed)
    if name == "smart":
        return config_hash("smart", stage_hash("ilkd", cfg), sft, cfg.smart, cfg.seed)
    if name == "kd":
        upstream = [stage_hash("ilkd", cfg)]
        if cfg.mix.get("selection") == "smart":
            upstream.append(stage_hash("smart", cfg))
        teacher = [cfg.model.kd_teacher, cfg.model.get("kd_teacher_base")]
        return config_hash("kd", upstream, cfg.mix, teacher, sft, cfg.kd, cfg.seed)
    if name == "dpo":
        return config_hash("dpo", stage_hash("kd", cfg), cfg.data.get("preference"), cfg.dpo, cfg.seed)
    raise ValueError(f"no stage hash for {name!r}")


def read_json(path: Path | str) -> dict:
    with open(path) as f:
        return json.load(f)


def kv_fraction(config) -> float:
    """KV cache per token of the hybrid relative to its base, measured from HybridCache allocations (DESIGN §2)."""
    return measure_cache_bytes(config)["kv_fraction"]


def model_card(*, title: str, stage: str, model, base: str, teacher: str, teacher_quantisation: str, data: str,
               tokens: int, extra: dict | None = None) -> str:
    cfg = model.config
    layers = list(getattr(cfg, "layer_types", []))
    mla = [i for i, t in enumerate(layers) if t == "mla"]
    lines = [
        "---", "library_name: transformers", "tags: [zebra, hybrid, mla, mamba2, distillation]", "---", "",
        f"# {title}", "",
        f"Produced by the `{stage}` stage of zebra (MLA + Mamba2 hybrid distilled from a Llama base; "
        "Zebra-Llama, arXiv 2505.17272).", "",
        "| | |", "|---|---|",
        f"| layers | {len(layers)} ({len(mla)} MLA, {len(layers) - len(mla)} Mamba2) |",
        f"| MLA layers | {mla} |",
        f"| layer types | {' '.join('A' if t == 'mla' else 'M' for t in layers)} |",
        f"| KV cache vs base | {100 * kv_fraction(cfg):.3f}% |",
        f"| parameters | {count_parameters(model):,} |",
        f"| base | {base} |",
        f"| teacher | {teacher} |",
        f"| teacher weights quantised | {teacher_quantisation} |",
        f"| data | {data} |",
        f"| tokens trained in this stage | {tokens:,} |",
    ]
    for k, v in (extra or {}).items():
        lines.append(f"| {k} | {v} |")
    if teacher_quantisation not in ("none",) and not teacher_quantisation.startswith("none"):
        lines += ["", f"Every number for this model was measured against a quantised teacher ({teacher_quantisation})."]
    lines += ["", "Load with `import zebra; AutoModelForCausalLM.from_pretrained(path)`.", ""]
    return "\n".join(lines)


def export_stage_model(cfg: DictConfig, trainer: pl.Trainer | None, model, tokenizer, dst: Path | str, card: str,
                       probe: dict | None = None) -> dict | None:
    """Write a stage's trained model to `dst` (atomically) as a Hugging Face directory; returns the export
    check (below) on rank 0, None elsewhere or when it is off.

    Collective: every rank must call it. Under ZeRO-3 the shards are gathered one decoder layer at a time into a
    CPU state dict on rank 0 (zebra.stages.zero), which writes the export from that; other strategies export the
    model as it is. With `export_check: true` the export is loaded back with `from_pretrained` (dtype and device
    of the in-memory model) and its logits on a probe batch are compared with the in-memory model's.
    """
    if not cfg.export:
        log.info("export=false: no model export written to %s", dst)
        return None
    to_save = zero.exportable(model, trainer.global_rank if trainer is not None else 0)
    reference = probe_reference(cfg, model, probe)
    if to_save is None:
        return None
    export.save_hf_model(to_save, dst, tokenizer, card)
    del to_save
    return compare_export(dst, *reference, model) if reference is not None else None


def dataset_description(data_cfg, key: str) -> str:
    """`<data name>: <source paths / hub names>` for model cards."""
    if data_cfg is None:
        return "?"
    name = str(data_cfg.get("name", "?"))
    node = data_cfg.get(key)
    if node is None:
        return name
    srcs = node.get("sources") or node.get("source") or []
    if not isinstance(srcs, (list, tuple)) and not OmegaConf.is_list(srcs):
        srcs = [srcs]
    names = [str(s.get("path") or s.get("name")) if hasattr(s, "get") else str(s) for s in srcs]
    return f"{name}: " + ", ".join(names) if names else name
