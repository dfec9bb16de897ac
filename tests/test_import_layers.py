"""The import direction of pyproject.toml's [tool.importlinter] contracts: kept by the tree as it is, and broken by
an upward import (checked on a copy of the package with one added, so the rule is seen to bite)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, "--config", str(root / "pyproject.toml")], cwd=root, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_the_tree_keeps_every_contract():
    out = lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(REPO / "zebra", tmp_path / "zebra", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "zebra" / "model" / "upward.py").write_text("from zebra.stages import artifacts  # noqa: F401\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    assert "zebra.model.upward -> zebra.stages.artifacts" in out.stdout, out.stdout
    assert "BROKEN" in out.stdout
