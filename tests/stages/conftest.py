"""Fixtures for the stage tests (helpers live in stage_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stage_helpers import compose_cfg, tiny_overrides, write_preferences, write_sft


@pytest.fixture(scope="session")
def data_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("data")
    return {"sft": write_sft(d / "sft.jsonl"), "pref": write_preferences(d / "pref.jsonl")}


@pytest.fixture
def make_cfg(tmp_path, data_files):
    def make(*extra: str, root: Path | None = None):
        return compose_cfg(tiny_overrides(root or tmp_path / "artifacts", data_files, list(extra)))
    return make
