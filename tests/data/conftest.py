"""Shared fixtures for the data tests: the real SmolLM2 tokenizer (converted once into the zebra cache),
a Llama-3-style variant of it, small jsonl files and one tokenised-data cache per session."""

from __future__ import annotations

import json
import os

import pytest
from tokenizers import AddedToken

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from zebra.compose.teacher import load_tokenizer  # noqa: E402

LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer("smollm2_135m")


@pytest.fixture(scope="session")
def llama3_tok():
    """SmolLM2's tokenizer plus the Llama-3 special tokens: enough for the reference template."""
    t = load_tokenizer("smollm2_135m")
    t.add_tokens([AddedToken(s, special=True, normalized=False) for s in LLAMA3_SPECIAL], special_tokens=True)
    t.bos_token = "<|begin_of_text|>"
    return t


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zebra-data-cache")


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def _chat(i: int, words: int = 12) -> dict:
    """A small, distinct conversation (document i)."""
    reply = " ".join(f"w{i}x{k}" for k in range(words))
    return {"messages": [{"role": "user", "content": f"Question number {i}?"}, {"role": "assistant", "content": reply}]}


@pytest.fixture
def write_jsonl():
    return _write_jsonl


@pytest.fixture
def chat():
    return _chat
