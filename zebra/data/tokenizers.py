"""Tokenizers for the DataModules: loaded on first use (zebra.compose.teacher.load_tokenizer: an embedded name, a
GGUF file, a directory or a hub id; None = the embedded default), fingerprinted for the tokenised-data cache."""

from __future__ import annotations

import hashlib
import json

from transformers import PreTrainedTokenizerBase

from zebra.compose.teacher import load_tokenizer


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
