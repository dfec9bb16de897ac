"""Stage `pipeline`: the stages of `stage.order` (default ilkd -> smart -> kd -> dpo) in turn, skipping finished ones.

A stage is finished when its export is complete and its report.json records this config's hash
(zebra.stages.artifacts: the hash chains the hashes of the stages it reads from). `force=true` re-runs every stage;
a stage that re-runs changes nothing upstream, but any stage after it whose inputs changed has a different hash
and re-runs too. With `ckpt_path=last` the first unfinished stage resumes from its checkpoint.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from zebra.stages import artifacts
from zebra.stages.artifacts import STAGES
from zebra.stages.errors import StageError
from zebra.utils.files import write_json_atomic

log = logging.getLogger("zebra.stages.pipeline")


def run_ilkd(cfg: DictConfig, force: bool) -> dict:
    """Train the students that are missing: together under ilkd.students=both, else one after the other (the
    memory-saving mode, e.g. at 8B)."""
    from zebra.stages.ilkd import run as ilkd

    missing = [k for k in STAGES["ilkd"].parts if force or not artifacts.is_done(cfg, "ilkd", k)]
    groups = [missing] if cfg.ilkd.students == "both" else [[k] for k in missing]
    report = {}
    for kinds in groups:
        sub = cfg.copy()
        with open_dict(sub):
            sub.ilkd.students = "both" if len(kinds) == 2 else kinds[0]
        report = ilkd(sub)
    return report


def check_order(cfg: DictConfig, order: list[str]) -> None:
    """Every stage's inputs run before it in `order` or were exported before, checked before anything runs."""
    unknown = [s for s in order if s not in STAGES]
    if unknown:
        raise StageError(f"stage.order has unknown stages {unknown}; known: {list(STAGES)}")
    for i, name in enumerate(order):
        for needed in STAGES[name].inputs(cfg):
            if needed not in order[:i] and not artifacts.exported(cfg, needed):
                raise StageError(f"{name} reads the {needed} stage's export, which is missing: add {needed} to "
                                 f"stage.order before {name}, or run it first")


def stage_order(cfg: DictConfig) -> list[str]:
    """`stage.order`, after the teacher_data stage when the data config samples its corpus from the teacher."""
    order = [str(s) for s in cfg.stage.order]
    if cfg.data.get("generate") is not None and "teacher_data" not in order:
        order.insert(0, "teacher_data")
    return order


def run(cfg: DictConfig) -> dict:
    from zebra.stages.run import runner

    order = stage_order(cfg)
    check_order(cfg, order)
    summary, start, cpu_start = {}, time.perf_counter(), time.process_time()
    for name in order:
        where = str(artifacts.stage_dir(cfg, name))
        if not cfg.force and artifacts.is_done(cfg, name):
            log.info("pipeline: %s already done for this config (%s), skipping", name, where)
            summary[name] = {"skipped": True, "dir": where}
            continue
        log.info("pipeline: running %s", name)
        t0, c0 = time.perf_counter(), time.process_time()
        report = run_ilkd(cfg, bool(cfg.force)) if name == "ilkd" else runner(name)(cfg)
        # Rank 0 exports a stage after its Trainer is done; no rank may start the next stage, which reads that
        # export, before it exists.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        gc.collect()  # the finished stage's models, optimiser state and trainer (reference cycles) go now
        summary[name] = {"skipped": False, "dir": where,
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
