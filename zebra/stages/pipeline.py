"""Stage `pipeline`: ilkd -> smart -> kd -> dpo in order, skipping finished stages.

A stage is finished when its report.json exists, records the same config hash (zebra.stages.stage_hash,
which chains the hashes of the stages it reads from) and its export is complete. `force=true` re-runs every
stage; a stage that re-runs changes nothing upstream, but any stage after it whose inputs changed has a
different hash and re-runs too. With `ckpt_path=last` the first unfinished stage resumes from its checkpoint.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from zebra.stages.artifacts import read_json, stage_hash
from zebra.stages.errors import StageError
from zebra.utils.files import write_json_atomic


log = logging.getLogger("zebra.stages.pipeline")

STAGES = ("ilkd", "smart", "kd", "dpo")


def stage_dir(cfg: DictConfig, name: str) -> Path:
    return Path(cfg.paths[f"{name}_dir"])


def _report_matches(report: Path, cfg: DictConfig, name: str) -> bool:
    try:
        return read_json(report).get("config_hash") == stage_hash(name, cfg)
    except (OSError, ValueError):
        return False


def ild_student_done(cfg: DictConfig, kind: str) -> bool:
    d = stage_dir(cfg, "ilkd") / kind
    return (d / "model" / "config.json").is_file() and _report_matches(d / "report.json", cfg, "ilkd")


def is_done(cfg: DictConfig, name: str) -> bool:
    d = stage_dir(cfg, name)
    if name == "ilkd":  # smart and kd need both students
        return all(ild_student_done(cfg, k) for k in ("mla", "mamba"))
    output = d / ("sensitivity.json" if name == "smart" else "model/config.json")
    return output.is_file() and _report_matches(d / "report.json", cfg, name)


def run_ilkd(cfg: DictConfig, force: bool) -> dict:
    """Train the students that are missing: together under ilkd.students=both, else one after the other (the
    memory-saving mode, e.g. at 8B)."""
    from omegaconf import open_dict

    from zebra.stages.ilkd import run as ilkd

    missing = [k for k in ("mla", "mamba") if force or not ild_student_done(cfg, k)]
    groups = [missing] if cfg.ilkd.students == "both" else [[k] for k in missing]
    report = {}
    for kinds in groups:
        sub = cfg.copy()
        with open_dict(sub):
            sub.ilkd.students = "both" if len(kinds) == 2 else kinds[0]
        report = ilkd(sub)
    return report


def run(cfg: DictConfig) -> dict:
    from zebra.stages.run import runner

    order = list(cfg.stage.get("order") or STAGES)
    unknown = [s for s in order if s not in STAGES]
    if unknown:
        raise StageError(f"stage.order has unknown stages {unknown}; known: {list(STAGES)}")
    if cfg.mix.get("selection") == "smart" and "kd" in order and "smart" not in order \
            and not (stage_dir(cfg, "smart") / "sensitivity.json").is_file():
        raise StageError("mix.selection=smart needs the smart stage: add it to stage.order or run it first")
    summary, start, cpu_start = {}, time.perf_counter(), time.process_time()
    for name in order:
        if not cfg.get("force") and is_done(cfg, name):
            log.info("pipeline: %s already done for this config (%s), skipping", name, stage_dir(cfg, name))
            summary[name] = {"skipped": True, "dir": str(stage_dir(cfg, name))}
            continue
        log.info("pipeline: running %s", name)
        t0, c0 = time.perf_counter(), time.process_time()
        report = run_ilkd(cfg, bool(cfg.get("force"))) if name == "ilkd" else runner(name)(cfg)
        # Rank 0 exports a stage after its Trainer is done; no rank may start the next stage, which reads that
        # export, before it exists.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        gc.collect()  # the finished stage's models, optimiser state and trainer (reference cycles) go now
        summary[name] = {"skipped": False, "dir": str(stage_dir(cfg, name)),
                         "wall_seconds": round(time.perf_counter() - t0, 2),
                         # CPU seconds of this process (all threads): wall x threads on an otherwise idle machine
                         "cpu_seconds": round(time.process_time() - c0, 2),
                         **{k: report.get(k) for k in ("loss_first", "loss_last", "tokens_seen", "heldout_kl_before",
                                                       "heldout_kl_after", "selections", "kv_fraction", "params")
                            if k in report}}
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    summary["cpu_seconds"] = round(time.process_time() - cpu_start, 2)
    summary["threads"] = torch.get_num_threads()
    out = Path(cfg.paths.model_dir) / cfg.mix.name / "pipeline.json"
    write_json_atomic(out, summary)
    log.info("pipeline done: %s", out)
    return summary
