"""Evaluate the teacher and exported models: held-out KL to the teacher, perplexity, size, KV cache, lm-eval tasks.

    python -m zebra.eval.evaluate --artifacts artifacts/smollm2_135m            # a training run: teacher, assembled,
                                                                            # KD'd and DPO'd hybrid of its mix
    python -m zebra.eval.evaluate --models path/to/model other/model --tasks zebra_mc
    python -m zebra.eval.evaluate --artifacts artifacts/smollm2_135m --tasks paper --device cuda --dtype bfloat16
    python -m zebra.eval.evaluate --artifacts artifacts/smollm2_135m --long-context \\
        --lengths 2048 4096 8192 16384 32768 --passkey-lengths 2048 4096 8192 16384 32768 --device cuda

Writes `report.json`, `report.md` (a table) and PNG plots into `--out` (default `<artifacts>/<mix>/eval/`):
loss_curves.png (per stage, from the Lightning CSV logs), smart/sensitivity.png, kv_cache.png (hybrid vs base
across mixes of every conf/model preset) and, with --long-context, long_context.png.

For each model: params (unique), kv_fraction and cache bytes per token (measured from HybridCache; 1.0 for the
teacher), held-out perplexity and mean per-token KL(teacher || model) on
  text: zebra/data/shipped/heldout.txt (or --text), rows of --seq-len tokens;
  sft:  the held-out split of the token mixture (the split the KD stage reports its held-out KL on);
and the lm-eval metrics of --tasks (default: the shipped offline task zebra_mc; `paper` = the paper's eight).

The models of a training run (`--artifacts <paths.root>/<model.name>`): the assembled-but-untrained hybrid (the
KD stage's starting point, rebuilt from the ILD exports with zebra.compose.assemble_hybrid and the layer list the kd
stage recorded), the KD'd hybrid (<mix>/kd/model) and the DPO'd hybrid (<mix>/dpo/model); the final hybrid is the
DPO'd one, else the KD'd one. Inputs are checked before anything heavy loads: a path that is not a model, a model
whose tokenizer differs from the teacher's, an unknown task name each raise an error that says so.

From Hydra, `run_eval(cfg)` does the same for the configured model/mix (see its docstring).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from zebra.eval.harness import expand_task_names, headline_metric, resolve_tasks, run_lm_eval
from zebra.eval.heldout import HELDOUT_SETS, sft_batches, text_rows
from zebra.eval.metrics import score_batches
from zebra.eval.models import (Candidate, EvalInputError, LoadedModel, cache_info, check_model_dir,
                               check_same_tokenizer, check_same_vocab, count_parameters, discover_candidates,
                               discover_mixes, lm_head_rows, load_eval_teacher, precheck_export)
from zebra.stages import artifacts

log = logging.getLogger("zebra.eval.evaluate")

DEFAULTS = {
    "tasks": ["zebra_mc"], "limit": None, "batch_size": 8, "num_fewshot": 0,
    "heldout": ["text", "sft"], "text": None, "seq_len": 512, "max_tokens": 4096, "sft_batches": 8,
    "sft_batch_size": 2, "long_context": False, "lengths": [256, 512, 1024, 2048],
    "passkey_lengths": [512, 1024, 2048], "windows": 2, "trials": 1, "long_context_models": "final",
    "plots": True, "students": False, "dtype": "auto", "device": "auto",
}


# ------------------------------------------------------------------------------------------------ core
def _collect() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _score_model(m: LoadedModel, teacher, data: dict, tasks: list[str], opts: dict) -> dict:
    """Everything measured for one model (the teacher included)."""
    info = cache_info(m.model)
    row = {"role": m.role, "source": m.source, "params": count_parameters(m.model),
           "kv_fraction": info["kv_fraction"], "cache_bytes_per_token": info["cache_bytes_per_token"],
           "cache_constant_bytes": info["cache_constant_bytes"], "mla_layers": info["mla_layers"],
           "layer_types": info["layer_types"], "load_seconds": round(m.load_seconds, 2), "heldout": {}}
    if m.notes:
        row["notes"] = list(m.notes)
    for name, d in data.items():
        row["heldout"][name] = score_batches(m.model, teacher, d["batches"])
    primary = "sft" if "sft" in row["heldout"] else ("text" if "text" in row["heldout"] else None)
    if primary:
        row["heldout_set"] = primary
        row["perplexity"] = row["heldout"][primary]["perplexity"]
        row["heldout_kl"] = row["heldout"][primary].get("kl_to_teacher", 0.0 if m.role == "teacher" else None)
    if tasks:
        row["lm_eval"] = run_lm_eval(m.model, m.tokenizer, tasks, batch_size=opts["batch_size"],
                                     limit=opts["limit"], num_fewshot=opts["num_fewshot"])
    return row


def evaluate(teacher_spec: str = "smollm2_135m", candidates: list[Candidate] | None = None,
             out_dir: str | Path = "eval", final: str | None = None, teacher_base: dict | None = None,
             tokenizer_spec: str | None = None, data_cfg=None, plot_dirs: dict | None = None,
             kv_highlight: dict | None = None, log_fn=None, **options) -> dict:
    """Evaluate the teacher and `candidates`; write report.json, report.md and plots into `out_dir`.

    options (see DEFAULTS): tasks, limit, batch_size, num_fewshot, heldout (sets: text, sft), text, seq_len,
    max_tokens, sft_batches, sft_batch_size, long_context, lengths, passkey_lengths, windows, trials,
    long_context_models ("final" | "all"), plots, dtype ("auto" | float32 | bfloat16), device ("auto" | cpu | cuda).
    `data_cfg`: a Hydra `data.sft` node for the sft held-out set (None: the shipped mixture). `plot_dirs`: stage
    directories for the loss curves ({"ilkd": ..., "kd": ..., "dpo": ...}) and "smart" for the SMART chart.
    """
    say = log_fn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown evaluate options {sorted(unknown)}")
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    device = opts["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = opts["dtype"]
    dtype = (torch.bfloat16 if device.startswith("cuda") else torch.float32) if dtype == "auto" else \
        getattr(torch, str(dtype))
    candidates = list(candidates or [])
    sets = [s for s in (opts["heldout"] or []) if s]
    bad_sets = [s for s in sets if s not in HELDOUT_SETS]
    if bad_sets:
        raise EvalInputError(f"unknown held-out set(s) {bad_sets}; choose from {list(HELDOUT_SETS)}")

    # cheap checks first: task names and model paths, before any weight is read
    tasks, _ = resolve_tasks(opts["tasks"])
    for c in candidates:
        if c.path is not None and not c.skipped:
            check_model_dir(c.path)
    start = time.perf_counter()
    out_dir = Path(out_dir)

    teacher = load_eval_teacher(teacher_spec, base=teacher_base, tokenizer_spec=tokenizer_spec, dtype=dtype,
                                device=device)
    tok = teacher.tokenizer
    say(f"teacher {teacher_spec}: loaded in {teacher.load_seconds:.1f}s")
    for c in candidates:  # tokenizers and vocabularies, before any candidate's weights are read
        if not c.skipped:
            src = c.path if c.path is not None else c.model_dir / "ilkd" / "mla" / "model"
            precheck_export(src, tok, lm_head_rows(teacher.model), c.name, teacher_spec)
    data, data_desc = {}, {}
    if "text" in sets:
        rows, source = text_rows(tok, opts["text"], int(opts["seq_len"]), opts["max_tokens"])
        data["text"] = {"batches": rows}
        data_desc["text"] = {"source": source, "rows": len(rows), "seq_len": int(opts["seq_len"]),
                             "tokens": int(sum(r["input_ids"].numel() for r in rows))}
    if "sft" in sets:
        batches, source = sft_batches(tok, data_cfg, int(opts["seq_len"]), int(opts["sft_batch_size"]),
                                      opts["sft_batches"])
        data["sft"] = {"batches": batches}
        data_desc["sft"] = {"source": source, "batches": len(batches), "seq_len": int(opts["seq_len"]),
                            "counted_tokens": int(sum(int(b["loss_mask"].sum()) for b in batches))}

    report = {"teacher": teacher_spec, "teacher_quantisation": teacher.quantisation, "device": device,
              "dtype": str(dtype).removeprefix("torch."), "heldout": data_desc, "tasks": tasks,
              "final": final, "models": {}, "skipped": {}}
    tm = LoadedModel("teacher", "teacher", teacher.model, tok, teacher_spec, [], teacher.load_seconds)
    report["models"]["teacher"] = _score_model(tm, teacher.model, data, tasks, opts)
    report["models"]["teacher"]["quantisation"] = teacher.quantisation
    say(f"teacher: {_summary(report['models']['teacher'])}")

    long_models = {}
    for c in candidates:
        if c.skipped:
            report["skipped"][c.name] = c.skipped
            say(f"{c.name}: skipped ({c.skipped})")
            continue
        m = c.load(dtype=dtype, device=device)
        if m.tokenizer is None:
            m.tokenizer = tok
        else:
            check_same_tokenizer(m.tokenizer, tok, f"{c.name} ({m.source})", teacher_spec)
        check_same_vocab(m.model, teacher.model, f"{c.name} ({m.source})", teacher_spec)
        report["models"][c.name] = _score_model(m, teacher.model, data, tasks, opts)
        say(f"{c.name}: {_summary(report['models'][c.name])}")
        keep_long = opts["long_context"] and (opts["long_context_models"] == "all" or c.name == final or
                                              (final is None and c is candidates[-1]))
        if keep_long:
            long_models[c.name] = m.model
        del m  # one candidate in memory at a time (plus the teacher and the long-context models)
        _collect()

    plots = {}
    if opts["long_context"]:
        from zebra.eval.long_context import evaluate_long_context, plot_long_context

        lc = evaluate_long_context({"teacher": teacher.model, **long_models}, tok, opts["lengths"],
                                   opts["passkey_lengths"], int(opts["windows"]), trials=int(opts["trials"]),
                                   text=opts["text"], log=say)
        report["long_context"] = lc
        if opts["plots"]:
            plots["long_context"] = plot_long_context(lc, out_dir / "long_context.png")
    if opts["plots"]:
        plots.update(_make_plots(out_dir, plot_dirs or {}, kv_highlight))
    report["plots"] = {k: v for k, v in plots.items() if v}
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_report(report, out_dir)
    say(f"wrote {out_dir / 'report.json'} and {out_dir / 'report.md'}")
    return report


def _summary(row: dict) -> str:
    parts = [f"params {row['params']:,}", f"KV {100 * row['kv_fraction']:.3f}%"]
    for name, h in row["heldout"].items():
        kl = h.get("kl_to_teacher")
        parts.append(f"{name} ppl {h['perplexity']:.3f}" + (f" KL {kl:.4f}" if kl is not None else ""))
    for task, metrics in (row.get("lm_eval") or {}).get("tasks", {}).items():
        parts.append(f"{task} {metrics.get('headline')} {metrics.get(metrics.get('headline'), float('nan')):.3f}")
    return ", ".join(parts)


def _make_plots(out_dir: Path, plot_dirs: dict, kv_highlight: dict | None) -> dict:
    from zebra.eval.plots import plot_kv_cache, plot_loss_curves, plot_smart

    out = {}
    stages = {k: v for k, v in plot_dirs.items() if k in ("ilkd", "kd", "dpo") and v is not None}
    if stages:
        out["loss_curves"] = plot_loss_curves(stages, out_dir / "loss_curves.png")
    if plot_dirs.get("smart") is not None:
        out["smart"] = plot_smart(plot_dirs["smart"], out_dir / "smart")
    from zebra.utils.paths import config_dir

    if (config_dir() / "model").is_dir():
        png, data = plot_kv_cache(None, out_dir / "kv_cache.png", highlight=kv_highlight)
        out["kv_cache"] = png
        (out_dir / "kv_cache.json").write_text(json.dumps(data, indent=1))
    return out


# ------------------------------------------------------------------------------------------------ report
def _fmt(x, digits=3, pct=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{100 * x:.{digits}f}%" if pct else f"{x:.{digits}f}"


def markdown_table(report: dict) -> str:
    sets = list(report.get("heldout") or {})
    tasks = report.get("tasks") or []
    metric_cols = []
    for t in tasks:
        seen = set()
        for row in report["models"].values():
            for k in (row.get("lm_eval") or {}).get("tasks", {}).get(t, {}):
                if k in ("acc", "acc_norm") and k not in seen:
                    seen.add(k)
        metric_cols += [(t, k) for k in ("acc", "acc_norm") if k in seen] or [(t, headline_metric(t))]
    head = ["model", "role", "params", "KV cache vs base"]
    for s in sets:
        head += [f"ppl ({s})", f"KL to teacher ({s})"]
    head += [f"{t} {k}" for t, k in metric_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in report["models"].items():
        label = name + (" (final)" if name == report.get("final") else "")
        cells = [label, row["role"], f"{row['params'] / 1e6:.2f}M", _fmt(row["kv_fraction"], 3, pct=True)]
        for s in sets:
            h = row["heldout"].get(s, {})
            cells += [_fmt(h.get("perplexity")), _fmt(h.get("kl_to_teacher"), 4) if name != "teacher" else "0"]
        tasks_out = (row.get("lm_eval") or {}).get("tasks", {})
        for t, k in metric_cols:
            v = tasks_out.get(t, {}).get(k)
            se = tasks_out.get(t, {}).get(f"{k}_stderr")
            cells.append("-" if v is None else f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se else ""))
        lines.append("| " + " | ".join(cells) + " |")
    out = ["# zebra evaluation", "",
           f"Teacher: `{report['teacher']}` (weights: {report.get('teacher_quantisation')}); device "
           f"{report.get('device')}, {report.get('dtype')}.", ""]
    for s, d in (report.get("heldout") or {}).items():
        n = d.get("tokens") or d.get("counted_tokens")
        out.append(f"- held-out `{s}`: {d['source']} ({n} tokens, rows of {d['seq_len']})")
    if tasks:
        out.append(f"- lm-eval tasks (zero-shot, accuracies in %, ± standard error): {', '.join(tasks)}")
    out += ["", *lines, ""]
    for name, why in (report.get("skipped") or {}).items():
        out.append(f"- {name}: skipped, {why}")
    lc = report.get("long_context")
    if lc:
        out += ["", "## Long context", ""]
        for name, res in lc["models"].items():
            ppl = res.get("perplexity_vs_length") or []
            if ppl:
                out.append(f"- {name} perplexity by length: " + ", ".join(
                    f"{r['length']}: {_fmt(r.get('perplexity'), 2)} (tail {_fmt(r.get('tail_perplexity'), 2)})"
                    for r in ppl))
            if res.get("passkey"):
                out.append(f"- {name} passkey accuracy by length: " + ", ".join(
                    f"{k}: {100 * v:.0f}%" for k, v in res["passkey"]["by_length"].items()))
    if report.get("plots"):
        out += ["", "Plots: " + ", ".join(f"[{k}]({Path(v).name if k != 'smart' else 'smart/' + Path(v).name})"
                                          for k, v in report["plots"].items())]
    return "\n".join(out) + "\n"


def write_report(report: dict, out_dir: str | Path) -> None:
    from zebra.utils.files import write_json_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(markdown_table(report))


# ------------------------------------------------------------------------------------------------ entry points
def _resolve_model_dir(path: Path) -> Path:
    """`--artifacts` may name <paths.root>/<model.name> or <paths.root> holding exactly one model's runs."""
    if not path.is_dir():
        raise EvalInputError(f"artifacts directory {path} does not exist")
    if artifacts.holds_run(path):
        return path
    runs = [d for d in sorted(path.iterdir()) if artifacts.holds_run(d)]
    if len(runs) == 1:
        return runs[0]
    if runs:
        raise EvalInputError(f"{path} holds runs of several models {[d.name for d in runs]}; pass one of them")
    raise EvalInputError(f"{path} holds no training run (no ilkd/ and no <mix>/kd or <mix>/dpo directory)")


def _teacher_from_report(model_dir: Path, mix: str | None) -> str | None:
    if mix is None:
        return None
    try:
        return json.loads((artifacts.layout(model_dir, "kd", mix) / "report.json").read_text()).get("teacher")
    except (OSError, ValueError):
        return None


def run_cli(argv=None) -> dict:
    """The command line as a function: parses `argv`, evaluates, returns the report; bad input raises
    EvalInputError (`main` turns it into a message and exit status 2)."""
    ap = argparse.ArgumentParser(prog="python -m zebra.eval.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to evaluate")
    g.add_argument("--teacher", default=None, help="teacher for KL (embedded name, GGUF, directory, hub id); default: "
                   "the kd stage's teacher of --artifacts, else smollm2_135m")
    g.add_argument("--models", nargs="*", default=[], metavar="DIR", help="exported model directories")
    g.add_argument("--artifacts", default=None, metavar="DIR", help="a training run: <paths.root>/<model.name>")
    g.add_argument("--mix", default=None, help="the mix under --artifacts (default: the only one)")
    g.add_argument("--mla-layers", nargs="*", type=int, default=None,
                   help="MLA layers of the assembled hybrid (default: from the kd stage's report/export)")
    g.add_argument("--students", action="store_true", help="also evaluate the ILD'd all-MLA / all-Mamba2 students")
    g = ap.add_argument_group("held-out data")
    g.add_argument("--heldout", nargs="*", default=DEFAULTS["heldout"], choices=list(HELDOUT_SETS))
    g.add_argument("--text", default=None, help="held-out text file for the 'text' set")
    g.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    g.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"], help="cap on 'text' tokens")
    g.add_argument("--sft-batches", type=int, default=DEFAULTS["sft_batches"])
    g = ap.add_argument_group("lm-eval")
    g.add_argument("--tasks", default="zebra_mc", help="comma-separated task names; 'paper' = the paper's eight, "
                   "'none' = skip lm-eval")
    g.add_argument("--limit", type=float, default=None, help="documents per task (testing only)")
    g.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    g.add_argument("--num-fewshot", type=int, default=0)
    g = ap.add_argument_group("long context")
    g.add_argument("--long-context", action="store_true", help="perplexity vs length and passkey retrieval")
    g.add_argument("--lengths", nargs="*", type=int, default=DEFAULTS["lengths"])
    g.add_argument("--passkey-lengths", nargs="*", type=int, default=DEFAULTS["passkey_lengths"])
    g.add_argument("--windows", type=int, default=DEFAULTS["windows"],
                   help="perplexity span = this many windows of the largest length")
    g.add_argument("--trials", type=int, default=1, help="passkeys per (length, depth)")
    g = ap.add_argument_group("run")
    g.add_argument("--out", default=None, help="output directory (default <artifacts>/<mix>/eval, else ./eval)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    candidates, final, plot_dirs, highlight = [], None, {}, None
    model_dir = mix = None
    if args.artifacts:
        model_dir = _resolve_model_dir(Path(args.artifacts))
        candidates, final = discover_candidates(model_dir, args.mix, args.mla_layers, args.students)
        mixes = discover_mixes(model_dir)
        mix = args.mix or (mixes[0] if len(mixes) == 1 else None)
        plot_dirs = {s: artifacts.layout(model_dir, s, mix) for s, st in artifacts.STAGES.items()
                     if mix or not st.per_mix}
        if mix:
            layers = next((c.mla_layers for c in candidates if c.role == "assembled"), None)
            if layers:
                highlight = {model_dir.name: len(layers)}
    for path in args.models:
        p = check_model_dir(path)
        name = p.name if p.name != "model" else p.parent.name
        taken = {c.name for c in candidates} | {"teacher"}
        if name in taken:
            name = str(path)
        candidates.append(Candidate(name, "given", path=p))
    teacher = args.teacher or (_teacher_from_report(model_dir, mix) if model_dir else None) or "smollm2_135m"
    out = Path(args.out) if args.out else (model_dir / mix / "eval" if model_dir and mix else
                                           (model_dir / "eval" if model_dir else Path("eval")))
    return evaluate(teacher, candidates, out, final=final, plot_dirs=plot_dirs, kv_highlight=highlight,
                    tasks=expand_task_names(args.tasks), limit=limit, batch_size=args.batch_size,
                    num_fewshot=args.num_fewshot, heldout=args.heldout, text=args.text, seq_len=args.seq_len,
                    max_tokens=args.max_tokens, sft_batches=args.sft_batches, long_context=args.long_context,
                    lengths=args.lengths, passkey_lengths=args.passkey_lengths, windows=args.windows,
                    trials=args.trials, plots=not args.no_plots, device=args.device, dtype=args.dtype)


def main(argv=None) -> None:
    try:
        run_cli(argv)
    except EvalInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


def run_eval(cfg) -> dict:
    """`stage=eval`: evaluate the configured run (`cfg.paths.model_dir`, `cfg.mix`) against `cfg.model.kd_teacher`.

    Options come from the `eval:` node of the config when present (else keys of `cfg.stage` other than `name`),
    with DEFAULTS for the rest: tasks, limit, batch_size, num_fewshot, heldout, text, seq_len, max_tokens,
    sft_batches, sft_batch_size, long_context, lengths, passkey_lengths, windows, trials, long_context_models,
    plots, students, dtype, device, models (extra exported directories). The sft held-out set is built from
    `cfg.data.sft`; the assembled hybrid's layers come from the kd stage's outputs, else from `cfg.mix`.
    Output: `${paths.model_dir}/${mix.name}/eval/{report.json,report.md,*.png}`.
    """
    from omegaconf import OmegaConf

    node = cfg.get("eval")
    if node is None:
        node = {k: v for k, v in cfg.stage.items() if k != "name"}
    opts = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    extra_models = opts.pop("models", None) or []
    students = bool(opts.pop("students", False))
    model_dir = Path(cfg.paths.model_dir)
    mix = str(cfg.mix.name)
    candidates, final = discover_candidates(model_dir, mix, None, students, require_mix=False)
    for c in candidates:  # no kd outputs yet: the configured mix says which layers are MLA
        if c.role == "assembled" and c.mla_layers is None and not (c.skipped or "").startswith("the ILD"):
            from zebra.plan.mixes import resolve_mla_layers

            c.mla_layers = resolve_mla_layers(cfg.mix, int(cfg.model.base.num_hidden_layers),
                                              artifacts.output_path(cfg, "smart"))
            c.layers_from, c.skipped = f"mix {mix}", None
    for path in extra_models:
        p = check_model_dir(path)
        candidates.append(Candidate(p.name, "given", path=p))
    if opts.get("dtype") in (None, "auto"):
        opts["dtype"] = cfg.get("teacher_dtype") if cfg.get("teacher_dtype") not in (None, "auto") else "auto"
        opts["dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(opts["dtype"], opts["dtype"])
    if opts.get("device") in (None, "auto"):
        acc = str(cfg.trainer.get("accelerator", "auto")) if cfg.get("trainer") is not None else "auto"
        opts["device"] = "cpu" if acc == "cpu" else "auto"
    if "tasks" in opts:
        opts["tasks"] = expand_task_names(opts["tasks"])
    layers = next((c.mla_layers for c in candidates if c.role == "assembled"), None)
    base = OmegaConf.to_container(cfg.model.base, resolve=True)
    return evaluate(str(cfg.model.kd_teacher), candidates, model_dir / mix / "eval", final=final,
                    teacher_base=base, tokenizer_spec=str(cfg.model.tokenizer), data_cfg=cfg.data.get("sft"),
                    plot_dirs={s: artifacts.stage_dir(cfg, s) for s in artifacts.STAGES},
                    kv_highlight={str(cfg.model.name): len(layers)} if layers else None,
                    log_fn=log.info if logging.getLogger().handlers else None, **opts)


if __name__ == "__main__":
    main()
