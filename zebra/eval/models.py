"""What an evaluation runs on: the teacher, exported models, the assembled hybrid; input checks; size and cache.

Everything here is Lightning-free. Bad input fails early with an `EvalInputError` naming the problem:
`NotAModelError` (a path that is not a Hugging Face model directory), `TokenizerMismatchError` (a model whose
tokenizer is not the teacher's, so KL over token ids would be meaningless), `UnknownTaskError` (zebra.eval.harness).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zebra.compose.teacher import has_tokenizer_files, load_teacher, load_tokenizer, tokenizer_differences


class EvalInputError(ValueError):
    """The evaluation was given something it cannot evaluate; the message says what and why."""


class NotAModelError(EvalInputError):
    """A path that is not a Hugging Face model directory (no config.json)."""


class TokenizerMismatchError(EvalInputError):
    """A model whose tokenizer differs from the teacher's."""


@dataclass
class LoadedModel:
    """A model ready to score: the module (eval mode), its tokenizer, and where it came from."""

    name: str
    role: str  # teacher | assembled | kd | dpo | ilkd_mla | ilkd_mamba | given
    model: torch.nn.Module
    tokenizer: object
    source: str  # a path, or a description of how it was built
    notes: list[str] = field(default_factory=list)
    load_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ input checks
def check_model_dir(path: str | Path) -> Path:
    """`path` as a Path if it is a Hugging Face model directory; NotAModelError otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise NotAModelError(f"{p} does not exist (expected an exported model directory with a config.json)")
    if not p.is_dir():
        raise NotAModelError(f"{p} is a file, not a model directory (expected a directory with a config.json)")
    if not (p / "config.json").is_file():
        entries = sorted(x.name + ("/" if x.is_dir() else "") for x in p.iterdir())
        listing = ", ".join(entries[:12]) + (", ..." if len(entries) > 12 else "") if entries else "it is empty"
        hint = ""
        if (p / "model" / "config.json").is_file():
            hint = f"; did you mean {p / 'model'}?"
        raise NotAModelError(f"{p} is not a model directory: it has no config.json ({listing}){hint}")
    try:
        json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise NotAModelError(f"{p / 'config.json'} is not a readable JSON model config: {err}") from err
    return p


def check_same_tokenizer(model_tok, teacher_tok, model_name: str, teacher_name: str) -> None:
    diffs = tokenizer_differences(model_tok, teacher_tok)
    if diffs:
        raise TokenizerMismatchError(
            f"the tokenizer of {model_name} differs from the teacher's ({teacher_name}): {'; '.join(diffs)}. "
            "KL to the teacher and perplexities compare distributions over the same token ids, so every evaluated "
            "model must use the teacher's tokenizer")


def check_same_vocab(model, teacher, model_name: str, teacher_name: str) -> None:
    rows, trows = lm_head_rows(model), lm_head_rows(teacher)
    if rows != trows:
        raise TokenizerMismatchError(
            f"{model_name} has {rows} LM-head rows but the teacher {teacher_name} has {trows}: the vocabularies "
            "differ, so KL to the teacher cannot be computed")


def precheck_export(path: Path, teacher_tok, teacher_rows: int, name: str, teacher_name: str) -> None:
    """The cheap part of the checks, before any weight is read: config vocab size and the exported tokenizer."""
    cfg = json.loads((check_model_dir(path) / "config.json").read_text())
    rows = cfg.get("vocab_size")
    if rows is not None and int(rows) != int(teacher_rows):
        raise TokenizerMismatchError(
            f"{name} ({path}) has a {rows}-token vocabulary but the teacher {teacher_name} has {teacher_rows}: the "
            "vocabularies differ, so KL to the teacher cannot be computed")
    if has_tokenizer_files(path):
        check_same_tokenizer(load_tokenizer(str(path)), teacher_tok, f"{name} ({path})", teacher_name)


def lm_head_rows(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


# ------------------------------------------------------------------------------------------------ loading
def load_exported(path: str | Path, name: str | None = None, role: str = "given", dtype=torch.float32,
                  device: str | torch.device = "cpu") -> LoadedModel:
    """An exported model directory (a zebra hybrid or a plain transformers model) and its tokenizer."""
    import zebra  # noqa: F401  (registers the hybrid with the Auto classes)
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    p = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(str(p)) if has_tokenizer_files(p) else None
    notes = [] if tokenizer is not None else ["no tokenizer in the export: the teacher's is used"]
    return LoadedModel(name or p.name, role, model, tokenizer, str(p), notes, time.perf_counter() - start)


@dataclass
class TeacherInfo:
    model: torch.nn.Module
    tokenizer: object
    source: str
    quantisation: str
    load_seconds: float


def load_eval_teacher(spec: str, base: dict | None = None, tokenizer_spec: str | None = None,
                      dtype=torch.float32, device: str | torch.device = "cpu") -> TeacherInfo:
    """The teacher named by `spec` (zebra.compose.teacher.load_teacher: an embedded name, a GGUF, a local directory,
    a hub id), or `random:<seed>` built from the `model.base` block `base` exactly as the ILD stage builds it (on
    CPU, then moved), with the tokenizer `tokenizer_spec` names (default: the embedded one)."""
    start = time.perf_counter()
    spec = str(spec)
    if spec.startswith("random:"):
        t = load_teacher(spec, dtype=dtype, device="cpu", base=base, tokenizer=tokenizer_spec or "default")
        t.model.to(device)
    else:
        t = load_teacher(spec, dtype=dtype, device=device)
    return TeacherInfo(t.model.eval(), t.tokenizer, spec, t.quantisation, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ artifacts
STAGE_DIRS = ("ilkd", "smart", "eval", "logs")


def discover_mixes(model_dir: Path) -> list[str]:
    """Mix names under `<paths.model_dir>`: subdirectories holding a kd/ or dpo/ stage directory."""
    out = []
    if model_dir.is_dir():
        for d in sorted(model_dir.iterdir()):
            if d.is_dir() and d.name not in STAGE_DIRS and ((d / "kd").is_dir() or (d / "dpo").is_dir()):
                out.append(d.name)
    return out


def mla_layers_of_export(path: Path) -> list[int] | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    types = cfg.get("hybrid_layer_types") or cfg.get("layer_types")  # the field's name in earlier exports
    if cfg.get("model_type") != "zebra" or not types:
        return None
    return [i for i, t in enumerate(types) if t == "mla"]


def assembled_layers(model_dir: Path, mix: str) -> tuple[list[int] | None, str]:
    """The MLA layer list the KD stage assembled its starting hybrid with, and where it was read from: the kd
    report's `mla_layers`, else the layer types of the KD or DPO export (training never changes them)."""
    mix_dir = model_dir / mix
    try:
        layers = json.loads((mix_dir / "kd" / "report.json").read_text()).get("mla_layers")
        if layers is not None:
            return [int(i) for i in layers], str(mix_dir / "kd" / "report.json")
    except (OSError, ValueError):
        pass
    for stage in ("kd", "dpo"):
        layers = mla_layers_of_export(mix_dir / stage / "model")
        if layers is not None:
            return layers, str(mix_dir / stage / "model" / "config.json")
    return None, "not found"


def build_assembled(model_dir: Path, mla_layers: list[int], dtype=torch.float32,
                    device: str | torch.device = "cpu") -> LoadedModel:
    """The hybrid the KD stage starts from: each decoder layer taken from the ILD'd student of its kind
    (`<model_dir>/ilkd/{mla,mamba}/model`), MLA at `mla_layers` (zebra.compose.students.assemble_hybrid)."""
    from zebra.compose.students import assemble_hybrid

    start = time.perf_counter()
    mla = load_exported(model_dir / "ilkd" / "mla" / "model", dtype=dtype, device=device)
    mamba = load_exported(model_dir / "ilkd" / "mamba" / "model", dtype=dtype, device=device)
    hybrid = assemble_hybrid(mla.model, mamba.model, mla_layers).eval()
    del mamba
    return LoadedModel("assembled", "assembled", hybrid, mla.tokenizer,
                       f"assemble_hybrid({model_dir / 'ilkd'}/{{mla,mamba}}/model, mla_layers={mla_layers})",
                       [], time.perf_counter() - start)


@dataclass
class Candidate:
    """A model to evaluate, loaded on demand (one at a time keeps memory at one model + the teacher)."""

    name: str
    role: str
    path: Path | None = None  # an export
    mla_layers: list[int] | None = None  # for role "assembled"
    layers_from: str = ""
    model_dir: Path | None = None
    skipped: str | None = None  # why it cannot be evaluated

    def load(self, dtype=torch.float32, device="cpu") -> LoadedModel:
        if self.role == "assembled":
            m = build_assembled(self.model_dir, self.mla_layers, dtype=dtype, device=device)
            m.name = self.name
            m.notes.append(f"MLA layers from {self.layers_from}")
            return m
        return load_exported(self.path, name=self.name, role=self.role, dtype=dtype, device=device)


def discover_candidates(model_dir: str | Path, mix: str | None = None, mla_layers: list[int] | None = None,
                        include_students: bool = False, require_mix: bool = True) -> tuple[list[Candidate], str | None]:
    """The models of one training run under `<paths.model_dir>` (= `<paths.root>/<model.name>`), for one mix:
    the assembled-but-untrained hybrid (built from the ILD exports; the KD stage's starting point), the KD'd
    hybrid (`<mix>/kd/model`) and the DPO'd hybrid (`<mix>/dpo/model`); with `include_students` also the ILD'd
    all-MLA and all-Mamba2 students. Returns (candidates, name of the final hybrid: dpo, else kd, else None).
    `mla_layers` overrides the assembled hybrid's layer list (default: read from the kd stage's outputs).
    `require_mix=False` accepts a mix with no stage directory yet (before KD: only the assembled hybrid).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise EvalInputError(f"artifacts directory {model_dir} does not exist (expected <paths.root>/<model.name>)")
    mixes = discover_mixes(model_dir)
    if mix is None:
        if len(mixes) > 1:
            raise EvalInputError(f"{model_dir} holds several mixes {mixes}; choose one with --mix")
        mix = mixes[0] if mixes else None
    elif require_mix and mix not in mixes and not (model_dir / mix).is_dir():
        raise EvalInputError(f"mix {mix!r} not found under {model_dir} (found: {mixes or 'none'})")
    out: list[Candidate] = []
    ild = model_dir / "ilkd"
    if include_students:
        for kind in ("mla", "mamba"):
            p = ild / kind / "model"
            if (p / "config.json").is_file():
                out.append(Candidate(f"ilkd_{kind}", f"ilkd_{kind}", path=p))
    final = None
    if mix is not None:
        layers, src = (mla_layers, "the caller") if mla_layers is not None else assembled_layers(model_dir, mix)
        cand = Candidate("assembled", "assembled", mla_layers=layers, layers_from=src, model_dir=model_dir)
        missing = [str(ild / k / "model") for k in ("mla", "mamba")
                   if not (ild / k / "model" / "config.json").is_file()]
        if missing:
            cand.skipped = f"the ILD exports are missing ({', '.join(missing)})"
        elif layers is None:
            cand.skipped = f"no MLA layer list for mix {mix!r} (no kd report or export; pass --mla-layers)"
        out.append(cand)
        for stage in ("kd", "dpo"):
            p = model_dir / mix / stage / "model"
            if (p / "config.json").is_file():
                out.append(Candidate(stage, stage, path=p))
                final = stage
    return out, final


# ------------------------------------------------------------------------------------------------ size and cache
def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    from zebra.plan.describe import count_parameters as _count

    return _count(model)


def cache_info(model) -> dict:
    """KV cache per token (bf16 bytes) and its fraction of the base Transformer's. A zebra hybrid's is measured
    from its HybridCache (zebra.model.cache.measure_cache_bytes); a Llama's is its K and V of g heads per layer."""
    cfg = model.config
    if getattr(cfg, "model_type", None) == "zebra":
        from zebra.model.cache import measure_cache_bytes

        c = measure_cache_bytes(cfg, dtype=torch.bfloat16)
        return {"kv_fraction": c["kv_fraction"], "cache_bytes_per_token": c["cache_bytes_per_token"],
                "cache_constant_bytes": c["cache_constant_bytes"],
                "base_kv_bytes_per_token": c["base_kv_bytes_per_token"], "mla_layers": cfg.mla_layers,
                "layer_types": "".join("A" if t == "mla" else "M" for t in cfg.hybrid_layer_types)}
    g = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * g * hd * 2  # K and V, bf16
    return {"kv_fraction": 1.0, "cache_bytes_per_token": float(per_token), "cache_constant_bytes": 0.0,
            "base_kv_bytes_per_token": float(per_token), "mla_layers": None,
            "layer_types": "T" * cfg.num_hidden_layers}  # T: a full attention layer
