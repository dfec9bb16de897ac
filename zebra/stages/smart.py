"""Stage `smart`: SMART layer sensitivities and selections (METHOD §5). No training.

Loads the ILD'd students (ilkd/{mla,mamba}/model) and the same-size base, measures on held-out calibration
batches s_i = KL(base || all-Mamba2) - KL(base || all-Mamba2 with layer i from the MLA student), and writes
sensitivity.json (scores + selections for each requested N), sensitivity.png and report.json into the smart
directory (zebra.stages.artifacts.finish: each file whole, the report last).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from zebra.stages import artifacts
from zebra.stages.budget import token_data
from zebra.stages.teacher import load_model_tokenizer, load_teacher_model

log = logging.getLogger("zebra.stages.smart")


def requested_sizes(cfg: DictConfig, num_layers: int) -> list[int]:
    sizes = [int(n) for n in cfg.smart.n_mla]
    if cfg.mix.selection == "smart" and cfg.mix.get("n_mla"):
        sizes.append(int(cfg.mix.n_mla))
    return sorted({n for n in sizes if 1 <= n <= num_layers})


def run(cfg: DictConfig) -> dict:
    from zebra.compose.smart import layer_sensitivities, write_smart_outputs
    from zebra.plan.selection import select_layers

    sc = cfg.smart
    start = time.perf_counter()
    mla = artifacts.load(cfg, "ilkd", part="mla").eval()
    mamba = artifacts.load(cfg, "ilkd", part="mamba").eval()
    tokenizer = load_model_tokenizer(cfg.model.tokenizer)
    base = load_teacher_model(cfg.model.teacher, cfg.model.base, dtype=torch.float32)
    dm = token_data(cfg, tokenizer, sc.split, sc.seq_len, sc.batch_size)
    batches = dm.calibration_batches(int(sc.tokens), batch_size=int(sc.batch_size), split=sc.split)
    n_tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    log.info("smart: %d calibration batches, %d counted tokens, %d layers", len(batches), n_tokens,
             mla.config.num_hidden_layers)
    scores = layer_sensitivities(base.model, mamba, mla, batches, log=log.info)
    num_layers = len(scores)
    selections = {n: select_layers(scores, n) for n in requested_sizes(cfg, num_layers)}
    wall = time.perf_counter() - start
    report = {"stage": "smart", "config_hash": artifacts.stage_hash(cfg, "smart"), "model": cfg.model.name,
              "base": cfg.model.teacher, "base_quantisation": base.quantisation, "calibration_split": sc.split,
              "calibration_tokens": n_tokens, "scores": scores,
              "selections": {str(n): v for n, v in selections.items()},
              "tokens_seen": n_tokens, "wall_seconds": round(wall, 2)}

    def outputs(tmp: Path):
        write_smart_outputs(tmp, scores, selections,
                            extra={"calibration_tokens": n_tokens, "base": str(cfg.model.teacher),
                                   "base_quantisation": base.quantisation})

    report = artifacts.finish(cfg, "smart", None, report, outputs=outputs)
    log.info("smart done: %s (selections %s)", artifacts.stage_dir(cfg, "smart"), selections)
    return report
