"""Helpers for the stage tests: Hydra-composed configs on the `tiny` preset with small local data files.

(A uniquely named module, so test files can import it whatever other conftest.py files are loaded.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from zebra.stages.config import register_resolvers

CONF = Path(__file__).resolve().parents[2] / "conf"
register_resolvers()
torch.set_num_threads(2)

_TOPICS = ["the sea", "a red bicycle", "prime numbers", "bread", "the moon", "rain", "chess", "a small garden",
           "trains", "coffee", "maps", "owls", "winter", "music", "rivers", "glass"]


def _conversation(rng: random.Random, i: int) -> dict:
    topic = rng.choice(_TOPICS)
    n = rng.randint(4, 14)
    answer = " ".join(rng.choice(["It", "is", "a", "thing", "about", topic, "that", "we", "like", "and", "see",
                                  "every", "day", "."]) for _ in range(n))
    return {"messages": [{"role": "user", "content": f"Tell me about {topic} ({i})."},
                         {"role": "assistant", "content": answer}]}


def write_sft(path: Path, n: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(json.dumps(_conversation(rng, i)) for i in range(n)) + "\n")
    return path


def write_preferences(path: Path, n: int = 24, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        rows.append({"prompt": f"Say something kind about {topic}.",
                     "chosen": f"{topic.capitalize()} is lovely and I like it a lot.",
                     "rejected": f"No. {topic} ? ? ? bad bad"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


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
