"""The whole run checked before any expensive work: every stage the command will run (the pipeline's included), its
budgets, the mix against the model's layer count, the data sources, and the teacher and tokenizer references. All
of it reads configs, file headers and small files only: no model loads, no GGUF conversion, no tokenisation, so a
bad input fails in the first seconds with one ZebraInputError naming it and saying how to fix it.

What each stage reads is one row of `CHECKS` (stage name -> StageChecks); a new stage adds its row (a stage
without one gets the config-wide checks only). Checks that are not a key list are functions of (cfg, stage),
listed in the row's `extra`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from zebra.errors import ConfigError, DataError, ZebraInputError, one_line

TEACHER_SPECS = ("an existing GGUF file or model directory, a hub id (owner/name), the embedded name "
                 "smollm2_135m, or random:<seed>")
BUDGET = ("max_steps", "tokens", "epochs")
FRACTIONAL = ("epochs",)  # budget keys that need not be whole


@dataclasses.dataclass(frozen=True)
class StageChecks:
    """What one stage reads from the config. Keys of the stage's own node (`cfg.<stage>`) unless dotted from the
    root (`model.teacher`)."""

    positive: tuple[str, ...] = ()  # must be set and > 0
    optional_positive: tuple[str, ...] = ()  # null (unset) or > 0
    non_negative: tuple[str, ...] = ()  # null or >= 0
    budget: tuple[str, ...] = ()  # at least one of them set (the first one set wins, zebra.stages.budget)
    lr: bool = False  # optimizer.lr > 0
    teachers: tuple[str, ...] = ()  # root keys naming a model whose weights (and tokenizer) the stage loads
    tokenizers: tuple[str, ...] = ()  # root keys naming a tokenizer the stage loads alone
    data: tuple[str, ...] = ()  # sections of cfg.data the stage reads: sft | preference
    mix: bool = False  # the stage builds the mix's hybrid: its MLA layers must fit the model
    extra: tuple[Callable[[DictConfig, str], None], ...] = ()
    # the stages whose exports a run of this stage alone reads (None: its inputs in the stage graph)
    reads: Callable[[DictConfig], tuple[str, ...]] | None = None


# ------------------------------------------------------------------------------------------------ small checks
def _node_key(stage: str, key: str) -> str:
    return key if "." in key else f"{stage}.{key}"


def _value(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(cfg: DictConfig, key: str, optional: bool = False, zero_ok: bool = False,
                   integer: bool = True) -> None:
    """`key` is a number > 0 (>= 0 with `zero_ok`; an integer unless `integer` is false; null with `optional`)."""
    value = _value(cfg, key)
    if value is None and optional:
        return
    least = 0 if zero_ok else 1
    ok = _is_number(value) and (value >= 0 if zero_ok else value > 0) and (not integer or float(value).is_integer())
    if not ok:
        what = ("a non-negative" if zero_ok else "a positive") + (" integer" if integer else " number")
        fix = f"{key}={least} or more" if integer else f"{key}=<number > 0>"
        raise ConfigError(f"{key} must be {what}{' or null' if optional else ''}, got {value!r} "
                          f"(set {fix}{', or null' if optional else ''})")


def check_budget(cfg: DictConfig, stage: str, keys: tuple[str, ...]) -> None:
    if not any(_value(cfg, _node_key(stage, k)) for k in keys):
        names = ", ".join(_node_key(stage, k) for k in keys)
        raise ConfigError(f"{stage} has no budget: {names} are all unset "
                          f"(set one, e.g. {_node_key(stage, keys[0])}=100)")


def _check_budgets(cfg: DictConfig, stage: str, row: StageChecks) -> None:
    for key in row.positive:
        check_positive(cfg, _node_key(stage, key))
    for key in row.optional_positive:
        check_positive(cfg, _node_key(stage, key), optional=True, integer=key not in FRACTIONAL)
    for key in row.non_negative:
        check_positive(cfg, _node_key(stage, key), optional=True, zero_ok=True)
    if row.budget:
        check_budget(cfg, stage, row.budget)
    if row.lr:
        check_positive(cfg, f"{stage}.optimizer.lr", integer=False)


def check_dpo_lengths(cfg: DictConfig, stage: str) -> None:
    prompt, total = cfg[stage].max_prompt_length, cfg[stage].max_length
    if not prompt < total:
        raise ConfigError(f"{stage}.max_prompt_length ({prompt}) must be less than {stage}.max_length ({total}) "
                          "(the responses need room)")


def check_kd_student_init(cfg: DictConfig, stage: str) -> None:
    init = str(cfg[stage].student_init)
    if init not in ("ilkd", "random"):
        raise ConfigError(f"{stage}.student_init must be 'ilkd' or 'random', got {init!r}")


def check_ilkd_students(cfg: DictConfig, stage: str) -> None:
    students = str(cfg[stage].students)
    if students not in ("both", "mla", "mamba"):
        raise ConfigError(f"{stage}.students must be both, mla or mamba, got {students!r}")


def check_smart_sizes(cfg: DictConfig, stage: str) -> None:
    """Selection sizes are positive integers (sizes above the layer count are skipped by the stage: one list of
    sizes serves every model)."""
    sizes = _value(cfg, f"{stage}.n_mla")
    sizes = list(sizes) if OmegaConf.is_list(sizes) or isinstance(sizes, (list, tuple)) else [sizes]
    bad = [n for n in sizes if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1)]
    if bad:
        raise ConfigError(f"{stage}.n_mla has sizes {bad} that are not positive integers (e.g. {stage}.n_mla=[2,4])")


# ------------------------------------------------------------------------------------------------ the mix
def model_layers(cfg: DictConfig) -> int:
    """The layer count the hybrid will have: the ILD'd students' (when exported; the stages build from them), else
    the base teacher's from its header or config.json, else `model.base`."""
    from zebra.stages import artifacts

    config = artifacts.output_path(cfg, "ilkd", "mla") / "config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text())["num_hidden_layers"])
        except (OSError, ValueError, KeyError):
            pass
    layers = spec_layers(str(cfg.model.teacher))
    return layers if layers is not None else int(cfg.model.base.num_hidden_layers)


def check_mix(cfg: DictConfig, stage: str) -> None:
    """The mix's MLA layers against the layer count (a smart mix: its count; the layers come from SMART)."""
    from zebra.plan.mixes import check_count, resolve_mla_layers

    mix = cfg.mix
    if mix.selection == "explicit" and (OmegaConf.is_missing(mix, "mla_layers") or mix.mla_layers is None):
        raise ConfigError("mix=explicit needs mix.mla_layers, the MLA layer indices (e.g. mix.mla_layers=[0,2])")
    random_init = stage == "kd" and str(cfg.kd.student_init) == "random"
    layers = int(cfg.model.base.num_hidden_layers) if random_init else model_layers(cfg)
    try:
        if mix.selection == "smart":
            check_count(layers, mix.get("n_mla"))
        else:
            resolve_mla_layers(mix, layers)
    except ValueError as err:
        raise ConfigError(f"{one_line(err)} of {cfg.model.name} (the {stage} stage builds this mix: choose at most "
                          f"{layers} MLA layers, indices 0..{layers - 1})") from err


# ------------------------------------------------------------------------------------------------ teachers
def _gguf_header_fields(path: Path) -> dict:
    """The metadata of a GGUF file, checked to be complete (every tensor's data inside the file)."""
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as err:  # the reader raises ValueError, IndexError, struct.error... on a damaged file
        raise ConfigError(f"GGUF file {path} is damaged or incomplete ({size:,} bytes; {type(err).__name__}: "
                          f"{one_line(err)}) (download or copy it again)") from err
    if end > size:
        raise ConfigError(f"GGUF file {path} is incomplete: its tensors need {end:,} bytes, the file has {size:,} "
                          "(download or copy it again)")
    return {k: f.contents() for k, f in reader.fields.items() if k in ("general.architecture", "llama.block_count")}


def _check_safetensors(directory: Path) -> None:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model directory {directory} holds no *.safetensors weights (save the model with "
                          "save_pretrained, which writes safetensors)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as err:  # a truncated file fails its header/size check here
            raise ConfigError(f"safetensors file {f} cannot be read: {one_line(err)} (save or copy it again)") from err


def _check_hub_cached(hub_id: str) -> None:
    """Offline, a hub id must be in the local Hugging Face cache (online, its download is the load's business)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import is_offline_mode

    if is_offline_mode() and not isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
        raise ConfigError(f"hub id {hub_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                          "(download it once online, or give a local directory)")


_checked_specs: dict[tuple[str, bool], int | None] = {}


def check_spec(spec: str, tokenizer_only: bool = False) -> int | None:
    """Check a teacher (weights and tokenizer) or tokenizer spec without loading it; returns the model's layer
    count when its header or config says it cheaply (None otherwise). Raises what zebra.compose.teacher raises
    (TeacherLoadError, UnsupportedTeacherError) or ConfigError."""
    from zebra.compose import teacher

    memo = (spec, tokenizer_only)
    if memo in _checked_specs:
        return _checked_specs[memo]
    try:
        kind, where = teacher.resolve_source(spec, tokenizer_only=tokenizer_only)
    except teacher.TeacherLoadError as err:  # no such path, nothing loadable in it, a bad random seed
        raise teacher.TeacherLoadError(f"{one_line(err)} (give {TEACHER_SPECS})") from err
    layers = None
    if kind == "random":
        if tokenizer_only:
            raise ConfigError(f"{spec!r} names a random model, which has no tokenizer (name a tokenizer: the "
                              "embedded smollm2_135m, a directory, a GGUF file or a hub id)")
    elif kind == "gguf":
        try:  # converted before: the cache's config is the header's, read in milliseconds
            cache_dir, _ = teacher.cached_gguf_dir(where, convert=False)
            layers = int(json.loads((cache_dir / "config.json").read_text())["num_hidden_layers"])
        except (teacher.TeacherLoadError, OSError, ValueError, KeyError):
            header = _gguf_header_fields(where)
            if header.get("general.architecture") != "llama":
                raise teacher.UnsupportedTeacherError(
                    f"GGUF file {where} has architecture {header.get('general.architecture')!r} (zebra composes from "
                    "Llama-architecture bases only: give a Llama GGUF)")
            layers = int(header["llama.block_count"]) if "llama.block_count" in header else None
    elif kind == "dir":
        where = Path(where)
        if not teacher.has_tokenizer_files(where):
            raise ConfigError(f"directory {where} holds no tokenizer (save the tokenizer into it: tokenizer.json "
                              "or tokenizer_config.json)")
        if not tokenizer_only:
            try:
                config = json.loads((where / "config.json").read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(f"{where / 'config.json'} cannot be read: {one_line(err)} (save the model "
                                  "again)") from err
            if config.get("model_type") != "llama":
                raise teacher.UnsupportedTeacherError(
                    f"model directory {where} holds a {config.get('model_type')!r} model (zebra composes from "
                    "Llama-architecture bases only: give a Llama)")
            _check_safetensors(where)
            layers = config.get("num_hidden_layers")
    else:
        _check_hub_cached(str(where))
    _checked_specs[memo] = layers
    return layers


def spec_layers(spec: str) -> int | None:
    try:
        return check_spec(spec)
    except ZebraInputError:
        return None  # reported by the teacher check, with the key that names it


def _set_by(cfg: DictConfig, key: str) -> str:
    """The key a user sets to change `key`: `key` itself, or the key it interpolates whole (model.kd_teacher is
    `${model.teacher}` unless set), so that an error names what the user wrote."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    raw = OmegaConf.to_container(node, resolve=False).get(leaf) if isinstance(node, DictConfig) else None
    match = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
    return _set_by(cfg, match.group(1)) if match else key


def check_reference(cfg: DictConfig, key: str, tokenizer_only: bool = False) -> None:
    """The spec at `key` (model.teacher, model.tokenizer, ...), with the key and how to fix it in the message."""
    key = _set_by(cfg, key)
    spec = _value(cfg, key)
    if spec is None or str(spec).strip() == "":
        raise ConfigError(f"{key} is not set (give {TEACHER_SPECS})")
    try:
        check_spec(str(spec), tokenizer_only=tokenizer_only)
    except ZebraInputError as err:
        raise type(err)(f"{key}={spec}: {one_line(err)}") from err


def _check_teachers(cfg: DictConfig, stage: str, row: StageChecks) -> None:
    for key in row.teachers:
        spec = str(_value(cfg, key))
        check_reference(cfg, key)
        if spec.startswith("random:"):  # its tokenizer is model.tokenizer; its shape model.base or a preset's
            check_reference(cfg, "model.tokenizer", tokenizer_only=True)
            preset = _value(cfg, "model.kd_teacher_base") if key == "model.kd_teacher" else None
            if preset:
                from zebra.plan.presets import preset_base

                try:
                    preset_base(str(preset))
                except (KeyError, ValueError, OSError) as err:
                    raise ConfigError(f"model.kd_teacher_base={preset}: {one_line(err)} (name a model preset "
                                      "of conf/model/, or null)") from err
            elif _value(cfg, "model.base") is None:
                raise ConfigError(f"{key}={spec} builds a random Llama from model.base, which is not set")
    for key in row.tokenizers:
        check_reference(cfg, key, tokenizer_only=True)


# ------------------------------------------------------------------------------------------------ data
_DATA_SPECS = {"sft": ("sources", "chat", {"path": "shipped:sft"}),
               "preference": ("source", "preference", {"path": "shipped:preferences"})}


def check_data(cfg: DictConfig, section: str) -> None:
    """Every source of `cfg.data.<section>`: its spec (zebra.data.sources), and a local file's content (exists,
    readable, not empty, the expected fields; read into the data's own raw cache, so the stage's read is free)."""
    from zebra.compose.teacher import cache_root
    from zebra.data.sources import Source, as_spec_list

    node = cfg.data.get(section)
    if node is None:
        raise ConfigError(f"data config {cfg.data.get('name')!r} has no `{section}` section (choose a data config "
                          f"that has one, e.g. data=default)")
    key, kind, default = _DATA_SPECS[section]
    cache_dir = Path(node.get("cache_dir") or cache_root() / "data") / "raw"
    for spec in as_spec_list(node.get(key), [default]):
        try:
            source = Source.from_spec(spec, kind=kind)
            if source.path is not None:
                source.load(cache_dir=cache_dir)
        except (ValueError, OSError) as err:
            raise DataError(f"{one_line(err)} (fix data.{section}.{key})") from err


def _check_data(cfg: DictConfig, stage: str, row: StageChecks) -> None:
    for section in row.data:
        if section not in _checked_data:
            check_data(cfg, section)
            _checked_data.add(section)


_checked_data: set[str] = set()


def check_generate(cfg: DictConfig, stage: str) -> None:
    """data.generate (data=teacher_generated): the sampling settings and the prompts' source."""
    gen = cfg.data.get("generate")
    if gen is None:
        raise ConfigError(f"stage {stage} samples the corpus that data.generate describes, and data config "
                          f"{cfg.data.get('name')!r} has none (use data=teacher_generated)")
    if not (_is_number(gen.top_p) and 0 < gen.top_p <= 1):
        raise ConfigError(f"data.generate.top_p must be in (0, 1], got {gen.top_p!r}")
    if not gen.responses_per_prompt and not gen.free_samples:
        raise ConfigError("data.generate.responses_per_prompt and data.generate.free_samples are both 0: nothing to "
                          "sample (set one > 0)")
    if gen.responses_per_prompt:
        from zebra.data.teacher_samples import prompt_conversations

        try:
            prompt_conversations(OmegaConf.to_container(gen.prompts, resolve=True) if OmegaConf.is_config(gen.prompts)
                                 else gen.prompts, gen.max_prompts)
        except (ValueError, OSError) as err:
            raise DataError(f"{one_line(err)} (fix data.generate.prompts)") from err


# ------------------------------------------------------------------------------------------------ the table
_TRAINING = dict(positive=("seq_len", "batch_size", "accumulate_grad_batches"), optional_positive=BUDGET,
                 non_negative=("checkpoint_every_n_steps",), budget=BUDGET, lr=True)


def _kd_reads(cfg: DictConfig) -> tuple[str, ...]:
    """A randomly initialised KD student (throughput runs) reads no ILD export; a smart mix still reads SMART's."""
    from zebra.stages.artifacts import STAGES

    inputs = STAGES["kd"].inputs(cfg)
    return tuple(s for s in inputs if s != "ilkd") if str(cfg.kd.student_init) == "random" else inputs


CHECKS: dict[str, StageChecks] = {
    "teacher_data": StageChecks(positive=("data.generate.max_new_tokens", "data.generate.batch_size"),
                                non_negative=("data.generate.responses_per_prompt", "data.generate.free_samples",
                                              "data.generate.temperature", "data.generate.top_k"),
                                teachers=("model.teacher",), tokenizers=("model.tokenizer",),
                                extra=(check_generate,)),
    "ilkd": StageChecks(**_TRAINING, teachers=("model.teacher",), tokenizers=("model.tokenizer",), data=("sft",),
                        extra=(check_ilkd_students,)),
    "smart": StageChecks(positive=("seq_len", "batch_size", "tokens"), teachers=("model.teacher",),
                         tokenizers=("model.tokenizer",), data=("sft",), extra=(check_smart_sizes,)),
    "kd": StageChecks(**{**_TRAINING, "non_negative": ("checkpoint_every_n_steps", "heldout_batches")},
                      teachers=("model.kd_teacher",), data=("sft",), mix=True, extra=(check_kd_student_init,),
                      reads=_kd_reads),
    "dpo": StageChecks(positive=("max_length", "max_prompt_length", "batch_size", "accumulate_grad_batches"),
                       optional_positive=("max_steps", "pairs", "epochs"), non_negative=("checkpoint_every_n_steps",),
                       budget=("max_steps", "pairs", "epochs"), lr=True, data=("preference",),
                       extra=(check_dpo_lengths,)),
}


# ------------------------------------------------------------------------------------------------ the run
def check_resolves(cfg: DictConfig) -> None:
    """Every value of the config has one: no `???` left, no interpolation that fails."""
    if cfg.mix.get("selection") == "explicit" and OmegaConf.is_missing(cfg.mix, "mla_layers"):
        raise ConfigError("mix=explicit needs mix.mla_layers, the MLA layer indices (e.g. mix.mla_layers=[0,2])")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} has no value (set {err.full_key}=... on the command line)") from err
    except OmegaConfBaseException as err:
        where = f" at {err.full_key}" if getattr(err, "full_key", None) else ""
        raise ConfigError(f"the config does not resolve{where}: {one_line(err)}") from err


def stages_to_run(cfg: DictConfig) -> list[str]:
    """The stages of the graph this command runs, in order ([] for describe and eval)."""
    from zebra.stages.artifacts import STAGES

    name = str(cfg.stage.name)
    if name == "pipeline":
        from zebra.stages.pipeline import check_order, stage_order

        order = stage_order(cfg)
        check_order(cfg, order)  # unknown stages, inputs neither run before nor exported
        return order
    if name in STAGES:
        return [name]
    return []


def check_inputs(cfg: DictConfig, stage: str) -> None:
    """The exports a single stage reads exist (a pipeline makes its own): a missing one names the command that
    makes it."""
    from zebra.stages import artifacts
    from zebra.stages.artifacts import STAGES

    row = CHECKS.get(stage)
    reads = row.reads if row is not None and row.reads is not None else STAGES[stage].inputs
    for needed in reads(cfg):
        for part in STAGES[needed].parts:
            artifacts.load(cfg, needed, "output", part=part)


def validate(cfg: DictConfig) -> list[str]:
    """Check everything the command will read (see the module docstring); returns the stages it will run."""
    _checked_specs.clear()
    _checked_data.clear()
    check_resolves(cfg)
    stages = stages_to_run(cfg)
    if "teacher_data" in stages:  # the sft corpus is this run's to write; the stages that read it check it then
        _checked_data.add("sft")
    for stage in stages:  # every config value first: they are the cheapest and the most often wrong
        row = CHECKS.get(stage)
        if row is not None:
            _check_budgets(cfg, stage, row)
            for extra in row.extra:
                extra(cfg, stage)
    if str(cfg.stage.name) != "pipeline":
        for stage in stages:
            check_inputs(cfg, stage)
    for stage in stages:
        row = CHECKS.get(stage)
        if row is not None and row.mix:
            check_mix(cfg, stage)
    for stage in stages:
        row = CHECKS.get(stage)
        if row is not None:
            _check_teachers(cfg, stage, row)
            _check_data(cfg, stage, row)
    return stages

