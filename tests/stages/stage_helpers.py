"""Helpers for the stage tests: Hydra-composed configs on the `tiny` preset with small local data files.

(A uniquely named module, so test files can import it whatever other conftest.py files are loaded.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from zebra.data.synthetic import write_preferences, write_sft  # noqa: F401  (re-exported for the tests)
from zebra.launch.resolvers import register_resolvers

CONF = Path(__file__).resolve().parents[2] / "conf"
register_resolvers()
torch.set_num_threads(2)


def tiny_overrides(root: Path, data_files: dict, extra: list[str] | None = None) -> list[str]:
    """A config for seconds-long runs: tiny random base, short rows, a handful of steps, CSV logging."""
    return [
        "model=tiny", "logger=csv", f"paths.root={root}", "trainer.enable_progress_bar=false",
        f"data.sft.sources=[{{path: '{data_files['sft']}'}}]",
        f"data.preference.source=[{{path: '{data_files['pref']}'}}]",
        "data.sft.heldout_fraction=0.1",
        "mix=uniform", "mix.n_mla=2",
        "ilkd.seq_len=32", "ilkd.batch_size=2", "ilkd.tokens=256", "ilkd.checkpoint_every_n_steps=0",
        "smart.seq_len=32", "smart.batch_size=2", "smart.tokens=64", "smart.n_mla=[1,2]",
        "kd.seq_len=32", "kd.batch_size=2", "kd.tokens=256", "kd.checkpoint_every_n_steps=0",
        "kd.heldout_batches=1",
        "dpo.max_length=64", "dpo.max_prompt_length=32", "dpo.batch_size=2", "dpo.pairs=8",
        "dpo.checkpoint_every_n_steps=0",
    ] + list(extra or [])


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose(config_name="config", overrides=overrides)
