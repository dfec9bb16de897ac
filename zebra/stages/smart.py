"""Stage `smart`: SMART layer sensitivities and selections (METHOD §5). No training.

Loads the ILD'd students (ilkd/{mla,mamba}/model) and the same-size base, measures on held-out calibration
batches s_i = KL(base || all-Mamba2) - KL(base || all-Mamba2 with layer i from the MLA student), and writes
sensitivity.json (scores + selections for each requested N), sensitivity.png and report.json into the smart
directory, atomically (the directory appears complete or not at all).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from zebra.stages.artifacts import stage_hash
from zebra.stages.budget import build_token_data
from zebra.stages.errors import MissingArtifactError
from zebra.stages.teacher import load_model_tokenizer, load_teacher_model
from zebra.utils.files import atomic_dir, write_json_atomic


log = logging.getLogger("zebra.stages.smart")


def load_ild_student(cfg: DictConfig, kind: str, dtype: torch.dtype = torch.float32, config_only: bool = False):
    """The ILD'd all-`kind` student exported by stage ilkd (only its config with `config_only`); a clear error
    when it is missing."""
    from zebra.model import ZebraConfig, ZebraForCausalLM

    path = Path(cfg.paths.ilkd_dir) / kind / "model"
    if not (path / "config.json").is_file():
        raise MissingArtifactError(
            f"the ILD'd {kind} student is missing: {path} (run `python train.py stage=ilkd` first, with "
            f"ilkd.students=both or {kind}, and the same model/paths settings)")
    if config_only:
        return ZebraConfig.from_pretrained(path)
    return ZebraForCausalLM.from_pretrained(path, dtype=dtype)


def requested_sizes(cfg: DictConfig, num_layers: int) -> list[int]:
    sizes = [int(n) for n in (cfg.smart.get("n_mla") or [])]
    if cfg.mix.get("selection") == "smart" and cfg.mix.get("n_mla"):
        sizes.append(int(cfg.mix.n_mla))
    return sorted({n for n in sizes if 1 <= n <= num_layers})


def run(cfg: DictConfig) -> dict:
    from zebra.compose.smart import layer_sensitivities, select_layers, write_smart_outputs

    sc = cfg.smart
    start = time.perf_counter()
    out_dir = Path(cfg.paths.smart_dir)
    mla = load_ild_student(cfg, "mla").eval()
    mamba = load_ild_student(cfg, "mamba").eval()
    tokenizer = load_model_tokenizer(cfg.model.tokenizer)
    base = load_teacher_model(cfg.model.teacher, cfg.model.base, dtype=torch.float32)
    dm = build_token_data(cfg, tokenizer, "heldout" if sc.split == "heldout" else sc.split, sc.seq_len,
                                 sc.batch_size)
    batches = dm.calibration_batches(int(sc.tokens), batch_size=int(sc.batch_size), split=sc.split)
    n_tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    log.info("smart: %d calibration batches, %d counted tokens, %d layers", len(batches), n_tokens,
             mla.config.num_hidden_layers)
    scores = layer_sensitivities(base.model, mamba, mla, batches, log=log.info)
    num_layers = len(scores)
    selections = {n: select_layers(scores, n) for n in requested_sizes(cfg, num_layers)}
    wall = time.perf_counter() - start
    report = {"stage": "smart", "config_hash": stage_hash("smart", cfg), "model": cfg.model.name,
              "base": cfg.model.teacher, "base_quantisation": base.quantisation, "calibration_split": sc.split,
              "calibration_tokens": n_tokens, "scores": scores,
              "selections": {str(n): v for n, v in selections.items()},
              "tokens_seen": n_tokens, "wall_seconds": round(wall, 2)}

    def write(tmp: Path):
        write_smart_outputs(tmp, scores, selections,
                            extra={"calibration_tokens": n_tokens, "base": str(cfg.model.teacher),
                                   "base_quantisation": base.quantisation})
        write_json_atomic(tmp / "report.json", report)

    with atomic_dir(out_dir) as tmp:
        write(tmp)
    log.info("smart done: %s (selections %s)", out_dir, selections)
    return report
