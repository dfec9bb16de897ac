"""The stage graph and the artifacts each stage leaves for the next (DESIGN §5).

`STAGES` is the graph: what each stage reads, which config keys its result depends on, and what it exports. Every
stage writes into one directory under `paths.model_dir` (per mix once the layer choice is made):

    <model_dir>/ilkd/{mla,mamba}/{model/, report.json}   one part per student; ilkd/report.json covers both
    <model_dir>/smart/{sensitivity.json, sensitivity.png, report.json}
    <model_dir>/<mix>/kd/{model/, report.json, checkpoints/}
    <model_dir>/<mix>/dpo/{model/, report.json, checkpoints/}

`finish` writes a part's outputs and then its report.json, which records the config hash (`stage_hash`): a part is
done (`is_done`) when its output exists and its report carries the current config's hash. `load` is how a stage
reads an earlier one's export. No finished result is lost: one made with another config is moved, before anything
is written, to `<part dir>/previous/<its config hash>/` (its outputs and report; `force=true` replaces it instead),
a run that trained no step is refused, and a killed write leaves the last finished result in place. A new stage
is one row in `STAGES` plus its runner `zebra.stages.<name>.run`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from zebra.model import export
from zebra.model.cache import measure_cache_bytes
from zebra.plan.describe import count_parameters
from zebra.stages import zero
from zebra.stages.errors import MissingArtifactError, StageError
from zebra.stages.export_check import compare_export, probe_reference
from zebra.utils import files

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger("zebra.stages")


@dataclasses.dataclass(frozen=True)
class Stage:
    inputs: Callable[[DictConfig], tuple[str, ...]]  # stages whose exports it reads; their hashes enter its own
    hashed: tuple[str, ...]  # config keys its result depends on
    output: str  # what a finished part holds beside its report.json
    what: str  # the output, named for messages ("{part}" stands for the part)
    parts: tuple[str, ...] = ("",)  # sub-directories finished one by one; "" is the stage directory itself
    per_mix: bool = False  # under <model_dir>/<mix.name>: the stage depends on the layer choice
    unhashed: tuple[str, ...] = ()  # keys inside `hashed` that change which parts run, not their result


def _kd_inputs(cfg: DictConfig) -> tuple[str, ...]:
    ild = ("ilkd", "smart") if cfg.mix.selection == "smart" else ("ilkd",)
    return ild + ("teacher_cache",) if cfg.kd.teacher_source == "cache" else ild


STAGES: dict[str, Stage] = {
    "teacher_data": Stage(inputs=lambda cfg: (),
                          hashed=("model.teacher", "model.tokenizer", "model.base", "data.generate"),
                          output="dataset", what="the teacher-generated corpus"),
    "ilkd": Stage(inputs=lambda cfg: ("teacher_data",) if cfg.data.get("generate") is not None else (),
                  hashed=("model.name", "model.teacher", "model.tokenizer", "model.base", "model.mla", "data.sft",
                          "ilkd", "init", "seed"),
                  output="model", what="the ILD'd {part} student", parts=("mla", "mamba"),
                  unhashed=("ilkd.students",)),
    "smart": Stage(inputs=lambda cfg: ("ilkd",), hashed=("data.sft", "smart", "seed"), output="sensitivity.json",
                   what="SMART's layer sensitivities"),
    "kd": Stage(inputs=_kd_inputs,
                hashed=("mix", "model.kd_teacher", "model.kd_teacher_base", "data.sft", "kd", "seed"),
                output="model", what="the KD'd hybrid", per_mix=True),
    "teacher_cache": Stage(inputs=lambda cfg: ("teacher_data",) if cfg.data.get("generate") is not None else (),
                           hashed=("model.kd_teacher", "model.kd_teacher_base", "model.tokenizer", "data.sft",
                                   "kd.split", "kd.seq_len", "kd.assistant_only", "kd.module.temperature",
                                   "teacher_cache"),
                           output="manifest.json", what="the KD teacher's top-k cache",
                           unhashed=("teacher_cache.batch_size", "teacher_cache.chunk_size")),
    "dpo": Stage(inputs=lambda cfg: ("kd",), hashed=("data.preference", "dpo", "seed"), output="model",
                 what="the DPO'd hybrid", per_mix=True),
}


# ------------------------------------------------------------------------------------------------ layout
def layout(model_dir: Path | str, stage: str, mix: str | None = None) -> Path:
    """The directory of `stage` in a run directory `<paths.root>/<model.name>` (per-mix stages need `mix`)."""
    if STAGES[stage].per_mix:
        if mix is None:
            raise ValueError(f"stage {stage!r} has one directory per mix: name the mix")
        return Path(model_dir) / mix / stage
    return Path(model_dir) / stage


def stage_dir(cfg: DictConfig, stage: str, part: str = "") -> Path:
    return layout(cfg.paths.model_dir, stage, str(cfg.mix.name)) / part


def output_path(cfg: DictConfig, stage: str, part: str = "") -> Path:
    return stage_dir(cfg, stage, part) / STAGES[stage].output


def checkpoint_dir(cfg: DictConfig, stage: str, parts: tuple[str, ...] = ()) -> Path:
    """`checkpoints/`, or `checkpoints-<parts>/` for a run that trains some of the stage's parts: each set of parts
    trained together resumes from its own."""
    whole = not parts or set(parts) == set(STAGES[stage].parts)
    return stage_dir(cfg, stage) / ("checkpoints" if whole else "checkpoints-" + "-".join(parts))


def holds_run(model_dir: Path | str) -> bool:
    """Whether `model_dir` holds a training run: some stage's directory (a per-mix one inside any mix)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return False
    if any(layout(model_dir, s).is_dir() for s, st in STAGES.items() if not st.per_mix):
        return True
    return any(layout(model_dir, s, d.name).is_dir() for d in model_dir.iterdir() if d.is_dir()
               for s, st in STAGES.items() if st.per_mix)


# ------------------------------------------------------------------------------------------------ identity
def config_hash(*parts) -> str:
    """Stable short hash of config pieces (resolved configs, dicts, lists, scalars)."""
    plain = [OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else p for p in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hashed_value(cfg: DictConfig, key: str, unhashed: tuple[str, ...]):
    value = OmegaConf.select(cfg, key, default=None)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    for skip in unhashed:
        if skip.startswith(key + ".") and isinstance(value, dict):
            value.pop(skip[len(key) + 1:], None)
    return value


def stage_hash(cfg: DictConfig, stage: str) -> str:
    """Hash of everything a stage's result depends on, chained through the stages it reads from, so that
    `stage=pipeline` re-runs a stage when its own config or any upstream stage's changed."""
    st = STAGES[stage]
    upstream = {name: stage_hash(cfg, name) for name in st.inputs(cfg)}
    return config_hash(stage, upstream, {key: _hashed_value(cfg, key, st.unhashed) for key in st.hashed})


# Keys of a stage's own node that set how long it trains, not what it trains: a run resumed with another budget
# (more tokens, a later max_steps) goes on from its checkpoint.
BUDGET_KEYS = ("tokens", "pairs", "max_steps", "epochs", "checkpoint_every_n_steps")


def resume_identity(cfg: DictConfig, stage: str) -> dict:
    """What a checkpoint of `stage` must share with the run that resumes from it, as dotted keys: the stage's hashed
    config without its budget keys, and the hashes of the stages it reads."""
    st = STAGES[stage]
    skip = st.unhashed + tuple(f"{stage}.{k}" for k in BUDGET_KEYS)
    values = _flatten({key: _hashed_value(cfg, key, skip) for key in st.hashed})
    values.update({f"{name} stage (config hash)": stage_hash(cfg, name) for name in st.inputs(cfg)})
    return values


def resume_differences(saved: dict, now: dict) -> list[str]:
    """`key: checkpoint's value -> this run's` for every key where two resume identities differ, the shallowest keys
    first (a user's `kd.optimizer.lr` before the `kd.module.optimizer.lr` that interpolates it)."""
    keys = sorted(set(saved) | set(now), key=lambda k: (k.count("."), k))
    return [f"{k}: {saved.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}" for k in keys
            if saved.get(k, "(unset)") != now.get(k, "(unset)")]


def check_resume(saved: dict | None, now: dict, what: str) -> None:
    """Refuse to resume from `what` when its recorded identity `saved` differs from this run's `now` (a checkpoint
    that records none, written before checkpoints recorded it, resumes)."""
    diffs = resume_differences(saved, now) if saved is not None else []
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise StageError(f"{what} was written by a run with another config ({shown}): resume with that config, or "
                         "train this one from the start with ckpt_path=null (its checkpoints then replace those)")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _exported(cfg: DictConfig, stage: str, part: str) -> bool:
    out = output_path(cfg, stage, part)
    return (out / "config.json").is_file() if STAGES[stage].output == "model" else out.exists()


def is_done(cfg: DictConfig, stage: str, part: str | None = None) -> bool:
    """Every part (or the one named) exported, with a report that records this config's hash."""
    digest = stage_hash(cfg, stage)
    return all(_exported(cfg, stage, p) and load(cfg, stage, "report", p).get("config_hash") == digest
               for p in ((part,) if part is not None else STAGES[stage].parts))


def exported(cfg: DictConfig, stage: str) -> bool:
    """Every part's output exists, whichever config made it (what a reading stage needs)."""
    return all(_exported(cfg, stage, p) for p in STAGES[stage].parts)


# ------------------------------------------------------------------------------------------------ reading
def load(cfg: DictConfig, stage: str, kind: str = "model", part: str = "", dtype: torch.dtype = torch.float32):
    """What a stage exported. `kind`: "model" (ZebraForCausalLM in `dtype`; A_log, D, dt_bias stay fp32), "config"
    (its ZebraConfig), "tokenizer", "output" (the path of the output, checked), or "report" (its report.json; {}
    before the stage has written one). A missing export raises MissingArtifactError naming the command to run."""
    if kind == "report":
        try:
            with open(stage_dir(cfg, stage, part) / "report.json") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}
    st = STAGES[stage]
    path = output_path(cfg, stage, part)
    if not _exported(cfg, stage, part):
        which = f" with {stage}.students=both or {part}," if len(st.parts) > 1 else ""
        raise MissingArtifactError(
            f"{st.what.format(part=part)} is missing: {path} (run `python train.py stage={stage}` first,{which} with "
            "the same model/mix/paths settings)")
    if kind == "output":
        return path
    if st.output != "model":
        raise ValueError(f"stage {stage!r} exports {st.output}, not a model: load it as kind='output'")
    if kind == "config":
        from zebra.model import ZebraConfig

        return ZebraConfig.from_pretrained(path)
    if kind == "tokenizer":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    if kind == "model":
        from zebra.model import ZebraForCausalLM

        return ZebraForCausalLM.from_pretrained(path, dtype=dtype)
    raise ValueError(f"unknown artifact kind {kind!r}: model, config, tokenizer, output or report")


# ------------------------------------------------------------------------------------------------ writing
PREVIOUS = "previous"  # <part dir>/previous/<config hash>/: the finished results of other configs, kept whole


def keep_previous(d: Path, digest: str, names: list[str]) -> Path | None:
    """Move the finished result in `d` of a config other than `digest` (the entries `names` and its report.json)
    to `d/previous/<its config hash>/`, so that a new run never replaces it. Outputs move before the report: a
    crash in between leaves the report behind, and the next call moves it after them. Returns where it went."""
    try:
        old = json.loads((d / "report.json").read_text()).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return None  # no finished result here (a report is written last)
    if not old or old == digest:
        return None
    keep = d / PREVIOUS / str(old)
    keep.mkdir(parents=True, exist_ok=True)
    for name in [*dict.fromkeys(names), "report.json"]:
        src, dst = d / name, keep / name
        if not (src.exists() or src.is_symlink()):
            continue
        if dst.is_dir() and not dst.is_symlink():  # the same config's result, kept by an earlier run
            shutil.rmtree(dst)
        os.replace(src, dst)
    return keep


def begin(cfg: DictConfig, stage: str, part: str = "", names: tuple[str, ...] | list[str] = ()) -> Path:
    """Make a part's directory ready for new outputs and return it: what a killed earlier write left is removed, a
    finished result of another config is moved to `previous/<its config hash>/` (`force=true`: left to be
    replaced) and the report is removed (the part is not done while its outputs change). `names`: the entries the
    stage writes besides its STAGES output. `finish` calls it; a stage that writes its outputs itself calls it
    before it starts writing."""
    st = STAGES[stage]
    d = stage_dir(cfg, stage, part)
    d.mkdir(parents=True, exist_ok=True)
    for name in (st.output, *names, "report.json"):
        files.remove_stale_temporaries(d / name)
    if cfg.force:
        if (d / "report.json").is_file():
            log.warning("%s: force=true, so the finished result in %s is replaced", stage, d)
    elif (kept := keep_previous(d, stage_hash(cfg, stage), [st.output, *names])) is not None:
        log.warning("%s: the finished result of another config is kept in %s (this run writes %s)", stage, kept, d)
    (d / "report.json").unlink(missing_ok=True)
    return d


def finish(cfg: DictConfig, stage: str, trainer: pl.Trainer | None, report: dict, *, part: str = "", model=None,
           tokenizer=None, card: dict | None = None, probe: dict | None = None,
           outputs: Callable[[Path], None] | None = None, checkpoints: Path | None = None) -> dict:
    """Finish a stage (or one part of it). A finished result of another config in its directory is moved to
    `previous/<its config hash>/` first (`force=true` replaces it instead); then the part's report.json is
    removed, its outputs are written (the Hugging Face `model/` with its card, renamed into place whole; or the
    files `outputs(tmp)` writes, each renamed into place), then the report, last, which marks the part done.
    What a killed earlier finish left (`.model.tmp-*`, ...) is removed. A run that trained no step exports
    nothing (StageError). `checkpoints` are removed afterwards under `checkpoint.keep_after_stage: false`.
    Returns the report (with `export_check` when a model is given).

    Collective when a model is given: every rank must call it. Under ZeRO-3 the shards are gathered one decoder
    layer at a time into a CPU copy on rank 0 (zebra.stages.zero), which writes; with `export_check: true` the
    export is loaded back with `from_pretrained` and its logits on a probe batch compared with the in-memory
    model's. `card`: model_card's arguments but the model. `export: false` writes the report only."""
    if trainer is not None and trainer.global_step == 0:  # every rank sees the same step: all raise
        raise StageError(f"{stage}: the run trained 0 optimiser steps, so there is nothing to export (check the "
                         f"{stage} budget: max_steps, tokens / pairs or epochs, and its data); every earlier result "
                         "is kept as it was")
    rank = trainer.global_rank if trainer is not None else 0
    to_save = reference = None
    if model is not None and cfg.export:
        to_save = zero.exportable(model, rank)
        reference = probe_reference(model, probe) if cfg.export_check else None
    if rank != 0:
        return report
    d = stage_dir(cfg, stage, part)
    d.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temporaries(d / "outputs")
    written = None
    try:
        if outputs is not None:  # written aside first: the names to keep from another config are then known
            written = Path(tempfile.mkdtemp(prefix=".outputs" + files.TMP_TAG, dir=d))
            outputs(written)
            files.share_as_umask_allows(written)
        begin(cfg, stage, part, sorted(f.name for f in written.iterdir()) if written is not None else ())
        if model is not None:
            report["export_check"] = None
            if to_save is None:
                log.info("export=false: no model export written to %s", d / "model")
            else:
                export.save_hf_model(to_save, d / "model", tokenizer, model_card(model=to_save, **(card or {})))
                del to_save
                if reference is not None:  # the finished export, loaded back as a user would
                    report["export_check"] = compare_export(d / "model", *reference, model)
        if written is not None:
            for f in written.iterdir():
                os.replace(f, d / f.name)
    finally:
        if written is not None:
            shutil.rmtree(written, ignore_errors=True)
    files.write_json_atomic(d / "report.json", report)
    if checkpoints is not None and not cfg.checkpoint.keep_after_stage and Path(checkpoints).exists():
        # the stage's result is its export (the smoke recipe's checkpoints would take ~6 GB)
        shutil.rmtree(checkpoints, ignore_errors=True)
        log.info("checkpoint.keep_after_stage=false: removed %s", checkpoints)
    return report


def kv_fraction(config) -> float:
    """KV cache per token of the hybrid relative to its base, measured from HybridCache allocations (DESIGN §2)."""
    return measure_cache_bytes(config)["kv_fraction"]


def model_card(*, title: str, stage: str, model, base: str, teacher: str, teacher_quantisation: str, data: str,
               tokens: int, extra: dict | None = None) -> str:
    cfg = model.config
    layers = list(getattr(cfg, "hybrid_layer_types", []))
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
    if not teacher_quantisation.startswith("none"):
        lines += ["", f"Every number for this model was measured against a quantised teacher ({teacher_quantisation})."]
    lines += ["", "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (the export carries "
              "its code), or without trust_remote_code after `import zebra`; the tokenizer is a plain "
              "`AutoTokenizer.from_pretrained(path)`.", ""]
    return "\n".join(lines)


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
