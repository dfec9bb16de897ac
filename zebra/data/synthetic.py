"""Small synthetic chat and preference files (JSONL) for smoke runs, benchmarks and tests: deterministic for a
seed, in the formats the data modules read (`messages` conversations; `prompt` / `chosen` / `rejected` pairs).
Their text is made up here; nothing is drawn from a real dataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = ["the sea", "a red bicycle", "prime numbers", "bread", "the moon", "rain", "chess", "a small garden",
          "trains", "coffee", "maps", "owls", "winter", "music", "rivers", "glass"]


def conversation(rng: random.Random, i: int) -> dict:
    """One user question and a short assistant answer about a random topic."""
    topic = rng.choice(TOPICS)
    n = rng.randint(4, 14)
    answer = " ".join(rng.choice(["It", "is", "a", "thing", "about", topic, "that", "we", "like", "and", "see",
                                  "every", "day", "."]) for _ in range(n))
    return {"messages": [{"role": "user", "content": f"Tell me about {topic} ({i})."},
                         {"role": "assistant", "content": answer}]}


def write_sft(path: Path, n: int = 80, seed: int = 0) -> Path:
    """`n` conversations, one JSON object a line."""
    rng = random.Random(seed)
    path = Path(path)
    path.write_text("\n".join(json.dumps(conversation(rng, i)) for i in range(n)) + "\n")
    return path


def write_preferences(path: Path, n: int = 24, seed: int = 0) -> Path:
    """`n` preference pairs: a kind answer chosen over a garbled one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append({"prompt": f"Say something kind about {topic}.",
                     "chosen": f"{topic.capitalize()} is lovely and I like it a lot.",
                     "rejected": f"No. {topic} ? ? ? bad bad"})
    path = Path(path)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
