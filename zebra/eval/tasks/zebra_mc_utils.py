"""Dataset loader of the shipped `zebra_mc` lm-eval task (referenced from zebra_mc.yaml as `!function`).

lm-eval imports this file by path, so it must not rely on being imported as part of the zebra package.
"""

import json
from pathlib import Path

DATA_FILE = Path(__file__).resolve().parent / "zebra_mc.jsonl"


def read_docs(path=DATA_FILE) -> list[dict]:
    """The questions: {"id", "question", "choices" (4 strings), "answer" (index of the right choice)}."""
    docs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for doc in docs:
        if len(doc["choices"]) != 4 or not 0 <= doc["answer"] < 4:
            raise ValueError(f"{path}: malformed question {doc.get('id')}: {doc}")
    return docs


def load_zebra_mc(**kwargs):
    """lm-eval `custom_dataset` hook: {"test": Dataset}. Extra keyword arguments (task metadata) are ignored."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_docs())})
