"""The quality benchmark's runs (what they are: the package docstring), each written to the JSON as it finishes, and
the command line."""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from pathlib import Path

import torch
from omegaconf import open_dict

import benchmarks.quality
from benchmarks.harness import versions
from benchmarks.quality import report as rp
from benchmarks.quality.curve import read_curve
from benchmarks.quality.runs import (BY_NAME, RUNS, NeedsRecipe, Run, base_overrides, compose_cfg, eval_cfg, fill,
                                     init_values, pipeline_cfg)
from zebra.utils.files import write_json_atomic

MODEL_STAGES = {  # which stages made each evaluated model (their tokens and wall times add up); teacher_data when
    # the data config samples the corpus from the teacher
    "ilkd_mla": ("teacher_data", "ilkd"), "ilkd_mamba": ("teacher_data", "ilkd"),
    "assembled": ("teacher_data", "ilkd", "smart"), "kd": ("teacher_data", "ilkd", "smart", "teacher_cache", "kd"),
    "dpo": ("teacher_data", "ilkd", "smart", "teacher_cache", "kd", "dpo"),
}
TRAINING_STAGES = ("ilkd", "kd", "dpo")  # SMART's calibration tokens are not trained on


def stage_reports(cfg, stages) -> dict:
    from zebra.stages import artifacts

    return {s: artifacts.load(cfg, s, "report") for s in stages}


def model_rows(evaluation: dict, reports: dict, run: Run) -> dict:
    """One row per evaluated model: held-out metrics of both sets, KV fraction, params, tokens trained and the
    wall time of the stages that made it."""
    rows = {}
    for name, m in evaluation["models"].items():
        row = {"params": m["params"], "kv_fraction": m["kv_fraction"], "mla_layers": m.get("mla_layers")}
        for s, h in m["heldout"].items():
            row[f"ppl_{s}"] = h["perplexity"]
            row[f"kl_{s}"] = h.get("kl_to_teacher", 0.0 if name == "teacher" else None)
        made_by = [s for s in MODEL_STAGES.get(name, ()) if s in reports]
        tokens = {s: int(reports[s].get("tokens_seen") or 0) for s in made_by if s in TRAINING_STAGES}
        if not run.ild_trained and "ilkd" in tokens:
            tokens["ilkd"] = 0  # one step at learning rate 0: the exports are the initialised students
        row["tokens_trained"] = sum(tokens.values())
        row["tokens_by_stage"] = tokens
        row["wall_seconds"] = round(sum(float(reports[s].get("wall_seconds") or 0) for s in made_by), 1)
        rows[name] = row
    return rows


def execute(run: Run, args, common: list[str], results: dict, log) -> dict:
    """Run one entry of RUNS: its pipeline, then stage=eval; returns its result (or why it was skipped)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from zebra.stages.run import run as run_stage

    recipe = results["runs"].get("recipe")
    recipe = recipe if recipe and "models" in recipe else None
    try:
        cfg = pipeline_cfg(run, common, args.root, recipe, args.smoke)
        ecfg = eval_cfg(run, common, args.root, recipe, args.smoke)
    except NeedsRecipe as err:
        return {"skipped": str(err)}
    except (HydraException, OmegaConfBaseException) as err:  # e.g. an init option the config does not have yet
        return {"skipped": f"its overrides do not compose: {type(err).__name__}: {str(err).splitlines()[0]}"}
    if run.name.startswith("init_") and recipe is not None and init_values(cfg) == recipe.get("init_values"):
        return {"skipped": "its initialisation is the recipe's own", "same_as": "recipe"}
    if args.force:
        with open_dict(cfg):
            cfg.force = True
    share_corpus(cfg, Path(args.root), run)
    start = time.perf_counter()
    log(f"{run.name}: {run.what}; stages {list(run.stages)} under {cfg.paths.model_dir}")
    pipeline = run_stage(cfg)
    train_seconds = time.perf_counter() - start
    evaluation = run_stage(ecfg)
    reports = stage_reports(cfg, (("teacher_data",) if cfg.data.get("generate") is not None else ()) + run.stages)
    kd = reports.get("kd") or {}
    result = {"what": run.what, "overrides": [*args.sets, *fill(run.overrides, recipe)],
              "stages": list(run.stages), "mix": str(cfg.mix.name), "mla_layers": kd.get("mla_layers"),
              "init_values": init_values(cfg), "models": model_rows(evaluation, reports, run),
              "pipeline": {k: v for k, v in pipeline.items() if isinstance(v, dict)},
              "stage_tokens_per_s": tokens_per_s(reports),
              "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - start -
                                                                              train_seconds, 1),
              "heldout_sets": evaluation.get("heldout"), "teacher_quantisation": evaluation.get("teacher_quantisation")}
    if "smart" in reports:
        result["smart_selections"] = reports["smart"].get("selections")
        # the per-layer sensitivities behind them: whether a placement lost to uniform by its scores or by noise
        result["smart_scores"] = reports["smart"].get("scores")
        result["smart_calibration_tokens"] = reports["smart"].get("calibration_tokens")
    if "teacher_cache" in reports:
        result["teacher_cache"] = {k: reports["teacher_cache"].get(k) for k in (
            "top_k", "tail_samples", "bytes_per_token", "bytes", "tokens_built_here", "build_seconds",
            "tokens_per_second")}
    return result


def share_corpus(cfg, root: Path, run: Run) -> None:
    """A data config that samples its corpus from the teacher (data=teacher_generated) writes it under the run's
    model directory: a run in a directory of its own reads the recipe's corpus (a link) instead of sampling the same
    one again (the teacher_data stage then finds it done for the same config)."""
    if cfg.data.get("generate") is None or run.directory == "recipe":
        return
    model_dir = Path(cfg.paths.model_dir)
    recipe_corpus = root.resolve() / "recipe" / model_dir.name / "teacher_data"
    mine = model_dir / "teacher_data"
    if recipe_corpus.is_dir() and not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.symlink_to(recipe_corpus, target_is_directory=True)


def tokens_per_s(reports: dict) -> dict:
    out = {}
    for s in TRAINING_STAGES:
        r = reports.get(s) or {}
        if r.get("tokens_seen") and r.get("wall_seconds"):
            out[s] = round(float(r["tokens_seen"]) / float(r["wall_seconds"]), 1)  # the stage's whole wall time
    return out


def run_curve(args, common: list[str], results: dict, save, log) -> None:
    """KD for --curve-tokens at the recipe's SMART layers from the recipe's ILD'd students, the held-out text
    scored every --curve-every steps (benchmarks.quality.curve); checkpoints at the same steps and ckpt_path=last,
    so that a call cut off by its time limit resumes on the next (while the artifacts root survives)."""
    from zebra.stages.run import run as run_stage

    recipe = results["runs"].get("recipe")
    every = int(args.curve_every)
    run = Run("curve", "KD for longer, held-out text scored along the way",
              ("mix=explicit", "mix.mla_layers={mla_layers}", f"kd.tokens={int(args.curve_tokens)}",
               f"kd.checkpoint_every_n_steps={every}", "checkpoint.keep_after_stage=true", "checkpoint.keep=1",
               "ckpt_path=last"), root="recipe")
    points_file = Path(args.root) / "curve.jsonl"
    out = results.setdefault("curve", {})
    try:
        cfg = pipeline_cfg(run, common, args.root, recipe, args.smoke)
    except NeedsRecipe as err:
        out["skipped"] = str(err)
        save()
        return
    seq = int(cfg.eval.seq_len) if "eval" in cfg else (64 if args.smoke else 512)
    with open_dict(cfg):
        cfg.callbacks["heldout_curve"] = {"_target_": "benchmarks.quality.curve.HeldoutCurve",
                                          "out": str(points_file), "tokenizer": str(cfg.model.tokenizer),
                                          "every_n_steps": every, "seq_len": seq,
                                          "max_tokens": 256 if args.smoke else 4096}
    out.update(tokens_budget=int(args.curve_tokens), every_n_steps=every, mix=str(cfg.mix.name),
               points_file=str(points_file), complete=False)
    log(f"curve: KD of {args.curve_tokens:,} tokens at {cfg.mix.name}, scored every {every} steps")
    start = time.perf_counter()
    try:
        report = run_stage(cfg)
        out["complete"] = True
        out["kd_wall_seconds"] = (report.get("kd") or {}).get("wall_seconds")
    finally:
        out["points"] = read_curve(points_file)
        out["seconds_this_call"] = round(time.perf_counter() - start, 1)
        save()


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    doc = benchmarks.quality.__doc__
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--out", default="experiments/quality/quality_bench.json",
                    help="results JSON; the results already in it are kept unless --fresh")
    ap.add_argument("--plot", default=None, help="PNG (default: quality.png beside --out)")
    ap.add_argument("--root", default="artifacts/quality", help="artifacts root of the runs (one folder per run)")
    ap.add_argument("--only", default=None, help="comma-separated run names (default: the default runs); "
                    "known: " + ", ".join(r.name for r in RUNS))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a Hydra override for every run (repeatable), e.g. --set data=teacher_generated")
    ap.add_argument("--smoke", action="store_true", help="model=tiny, a random teacher, CPU, a few steps")
    ap.add_argument("--fresh", action="store_true", help="start a new JSON instead of merging into --out")
    ap.add_argument("--force", action="store_true", help="re-run stages that are already done (force=true)")
    ap.add_argument("--missing", action="store_true",
                    help="only the runs that have no result in --out yet (the same command resumes a cut-off call)")
    ap.add_argument("--curve", action="store_true", help="also the longer KD with its held-out curve")
    ap.add_argument("--curve-tokens", type=int, default=None, help="the curve's KD budget (default 48M; smoke 1k)")
    ap.add_argument("--curve-every", type=int, default=None, help="steps between points (default 100; smoke 4)")
    args = ap.parse_args(argv)
    args.curve_tokens = args.curve_tokens or (1024 if args.smoke else 48_000_000)
    args.curve_every = args.curve_every or (4 if args.smoke else 100)
    args.plot = args.plot or str(Path(args.out).with_name("quality.png"))
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else \
        [r.name for r in RUNS if r.default]
    unknown = [n for n in names if n not in BY_NAME and n != "curve"]
    if unknown:
        ap.error(f"unknown run(s) {unknown}; known: {[r.name for r in RUNS]} and curve")
    if "curve" in names:
        names.remove("curve")
        args.curve = True
    args.names = names
    return args


def load_results(path: Path, smoke: bool, fresh: bool) -> dict:
    if not fresh and path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("benchmark") == "quality" and bool(old.get("smoke")) == smoke:
            return old
    return {"benchmark": "quality", "smoke": smoke, "runs": {}}


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    out = Path(args.out)
    results = load_results(out, args.smoke, args.fresh)
    if args.missing:
        args.names = [n for n in args.names if "models" not in results["runs"].get(n, {})]
        args.curve = args.curve and not (results.get("curve") or {}).get("complete")
    common = base_overrides(args.smoke, args.sets)
    compose_cfg(common)  # the recipe and --set compose, before anything runs
    results.update(device=device_name(), versions=versions("transformers", "lightning", "mamba_ssm", "hydra-core"),
                   recipe_overrides=common)
    calls = results.setdefault("calls", [])
    calls.append({"runs": list(args.names) + (["curve"] if args.curve else []), "device": results["device"],
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def save():
        results["summary"] = rp.summary(results)
        calls[-1]["seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(out, results)

    for name in args.names:
        run = BY_NAME[name]
        start = time.perf_counter()
        try:
            res = execute(run, args, common, results, log)
        except Exception as err:  # noqa: BLE001 - recorded; the other runs still run
            traceback.print_exc()
            res = {"error": f"{type(err).__name__}: {err}"}
            if args.smoke:
                results["runs"][name] = res
                save()
                raise
        res["seconds"] = round(time.perf_counter() - start, 1)
        res["device"] = results["device"]
        results["runs"][name] = res
        log(f"{name}: " + (res.get("skipped") or res.get("error") or rp.run_line(res)))
        save()
    if args.curve:
        run_curve(args, common, results, save, log)
    save()
    print(rp.table(results), flush=True)
    print(rp.verdict(results), flush=True)
    png = rp.plot(results, args.plot)
    if png:
        log(f"wrote {out} and {png}")
    return results
