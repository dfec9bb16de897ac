"""LM-Harness zero-shot evaluation through lm-eval, on a model *instance*.

`run_lm_eval(model, tokenizer, tasks)` wraps the model in `lm_eval.models.huggingface.HFLM(pretrained=model,
tokenizer=..., batch_size=...)` (HFLM's own constructor, given an already-built model) and runs
`lm_eval.simple_evaluate`. Task names are checked first, so a typo fails in a second, listing what exists.

Tasks:
- the paper's eight (METHOD §8), scored as the paper does: acc_norm for ARC-Challenge, ARC-Easy, HellaSwag,
  OpenBookQA, PIQA and acc for MMLU, RACE, WinoGrande (`paper` names all eight). They download their datasets
  from the Hugging Face hub, so they need network access (or a pre-filled HF datasets cache).
- shipped local tasks in lm-eval's YAML format under zebra/eval/tasks/ (`zebra_mc`: 42 four-choice general
  knowledge questions written for zebra), which run offline.
- any other task lm-eval knows.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from zebra.eval.models import EvalInputError

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# the paper's task -> the metric its table reports
PAPER_TASKS = {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm", "mmlu": "acc",
               "openbookqa": "acc_norm", "piqa": "acc_norm", "race": "acc", "winogrande": "acc"}
LOCAL_HEADLINE = {"zebra_mc": "acc"}
ALIASES = {"paper": list(PAPER_TASKS), "local": sorted(LOCAL_HEADLINE)}

log = logging.getLogger("zebra.eval")


class UnknownTaskError(EvalInputError):
    """A task name lm-eval does not know (neither shipped nor registered)."""


class TaskUnavailableError(RuntimeError):
    """A known task that cannot run here (typically: its dataset needs the hub and there is no network)."""


def headline_metric(task: str) -> str:
    return PAPER_TASKS.get(task) or LOCAL_HEADLINE.get(task) or "acc"


def expand_task_names(names) -> list[str]:
    """Comma/space separated or list; `paper` and `local` expand; `none` or empty means no task."""
    if names is None:
        return []
    if isinstance(names, str):
        names = names.replace(",", " ").split()
    out = []
    for n in names:
        n = str(n).strip()
        if not n or n.lower() == "none":
            continue
        for t in ALIASES.get(n, [n]):
            if t not in out:
                out.append(t)
    return out


@functools.lru_cache(maxsize=2)
def task_manager(include_defaults: bool):
    """lm-eval's TaskManager over the shipped tasks, plus lm-eval's own (~8 s to index) when asked."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=include_defaults)


def local_task_names() -> list[str]:
    return sorted(task_manager(False).all_tasks)


def resolve_tasks(names) -> tuple[list[str], object]:
    """(task names, the TaskManager that knows them). UnknownTaskError lists what is available."""
    tasks = expand_task_names(names)
    if not tasks:  # held-out metrics only: lm-eval need not even be installed (the GPU machine lacks it)
        return [], None
    local = set(local_task_names())
    if all(t in local for t in tasks):
        return tasks, task_manager(False)
    tm = task_manager(True)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UnknownTaskError(
            f"unknown lm-eval task(s) {unknown}. Shipped offline tasks: {sorted(local)}; the paper's tasks: "
            f"{list(PAPER_TASKS)} (alias 'paper', needs the hub); aliases: {sorted(ALIASES)}; lm-eval knows "
            f"{len(known)} task/group names in all (`python -m lm_eval ls tasks`)")
    return tasks, tm


def _parse_results(results: dict, tasks: list[str], n_samples: dict) -> dict:
    """lm-eval's results table -> {task: {metric: value, metric_stderr: value, n: docs}}."""
    out = {}
    for task, row in results.items():
        if task not in tasks:  # the subtasks of a group (mmlu's 57) stay out of the report
            continue
        metrics = {}
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            if filt != "none":
                metric = f"{metric}[{filt}]"
            metrics[metric] = float(value)
        if task in n_samples:
            metrics["n"] = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        out[task] = metrics
    for task in out:
        out[task]["headline"] = headline_metric(task)
    return out


def run_lm_eval(model, tokenizer, tasks, batch_size: int = 8, limit: int | float | None = None,
                num_fewshot: int = 0, max_length: int | None = None) -> dict:
    """Zero-shot lm-eval over a model instance. Returns {"tasks": {task: {metric: value, ...}}, "seconds",
    "lm_eval_version", "limit"}; `paper_average` (mean of the paper's metrics, in %) when all eight ran."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names, tm = resolve_tasks(tasks)
    if not names:
        return {"tasks": {}}
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # per-task notices ("Custom kwargs can be passed ...") and the instance warning
    try:
        # HFLM's own constructor with a model instance; backend "causal" because lm-eval's registry does not list
        # the hybrid's model_type, and our tokenizer (the teacher's) is passed explicitly.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), backend="causal",
                  max_length=max_length)
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, num_fewshot=num_fewshot,
                                          limit=limit, log_samples=False, bootstrap_iters=1000)
        except Exception as err:  # noqa: BLE001 - re-raised with the likely cause named
            hub = [t for t in names if t not in set(local_task_names())]
            if hub:
                raise TaskUnavailableError(
                    f"lm-eval could not run {hub}: {type(err).__name__}: {err}. These tasks download their datasets "
                    "from the Hugging Face hub: run where the hub is reachable (unset HF_HUB_OFFLINE / "
                    "HF_DATASETS_OFFLINE) or fill the HF datasets cache first; the shipped offline task is "
                    f"{local_task_names()}") from err
            raise
    finally:
        model.train(was_training)
        quiet.setLevel(level)
    parsed = _parse_results(res["results"], names, res.get("n-samples") or {})
    out = {"tasks": parsed, "seconds": round(time.perf_counter() - start, 1),
           "lm_eval_version": getattr(lm_eval, "__version__", "?"), "limit": limit, "num_fewshot": num_fewshot}
    if all(t in parsed and parsed[t].get(PAPER_TASKS[t]) is not None for t in PAPER_TASKS):
        out["paper_average"] = 100 * sum(parsed[t][PAPER_TASKS[t]] for t in PAPER_TASKS) / len(PAPER_TASKS)
    return out
