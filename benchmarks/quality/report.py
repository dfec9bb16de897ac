"""The quality benchmark's summary (targets and the ablations' order, rewritten into the JSON after every run), its
printed table and its plot."""

from __future__ import annotations

import math

TARGET_PPL_RATIO = 1.5  # the recipe's hybrid on heldout.txt: perplexity at most 1.5x the teacher's
TARGET_KL = 0.5  # ... and mean per-token KL(teacher || hybrid) at most 0.5 nats
CACHE_REL_TOL = 0.03  # KD from the teacher cache: held-out KL and perplexity within 3% of online KD's
MODEL_ORDER = ("teacher", "ilkd_mla", "ilkd_mamba", "assembled", "kd", "dpo")


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def teacher_row(results: dict) -> dict | None:
    for res in results.get("runs", {}).values():
        if "teacher" in res.get("models", {}):
            return res["models"]["teacher"]
    return None


def final_model(res: dict) -> str | None:
    models = res.get("models", {})
    return "dpo" if "dpo" in models else ("kd" if "kd" in models else None)


def _kd_value(results: dict, run: str, key: str):
    res = results.get("runs", {}).get(run) or {}
    if "same_as" in res:  # not run again: its config is that run's
        res = results["runs"].get(res["same_as"]) or {}
    return (res.get("models") or {}).get("kd", {}).get(key)


def _order(results: dict, better: str, worse: str, claim: str) -> dict:
    """Whether `better`'s KD hybrid has the lower KL on heldout.txt than `worse`'s, and by how much (both sets)."""
    out = {"claim": claim}
    for s in ("text", "sft"):
        a, b = _kd_value(results, better, f"kl_{s}"), _kd_value(results, worse, f"kl_{s}")
        if _ok(a) and _ok(b):
            out[f"kl_{s}"] = {better: a, worse: b, "difference": b - a}
    if "kl_text" in out:
        out["holds"] = out["kl_text"]["difference"] >= 0
    return out


def summary(results: dict) -> dict:
    """Targets for the recipe's final hybrid and its KD hybrid, and the ablations' order."""
    t = teacher_row(results)
    s = {"targets": {"ppl_ratio_max": TARGET_PPL_RATIO, "kl_max_nats": TARGET_KL, "on": "heldout.txt"}}
    if t is None:
        return s
    s["teacher_ppl_text"] = t.get("ppl_text")
    recipe = results.get("runs", {}).get("recipe") or {}
    for name in ("kd", "dpo"):
        m = recipe.get("models", {}).get(name)
        if m and _ok(m.get("ppl_text")) and _ok(t.get("ppl_text")):
            ratio = m["ppl_text"] / t["ppl_text"]
            s[f"recipe_{name}"] = {"ppl_text": m["ppl_text"], "ppl_ratio": ratio, "kl_text": m.get("kl_text"),
                                   "meets_ppl_target": ratio <= TARGET_PPL_RATIO,
                                   "meets_kl_target": _ok(m.get("kl_text")) and m["kl_text"] <= TARGET_KL,
                                   "kv_fraction": m.get("kv_fraction"), "tokens_trained": m.get("tokens_trained"),
                                   "wall_seconds": m.get("wall_seconds")}
    s["ablations"] = {
        "ild": _order(results, "recipe", "no_ild", "ILD beats no ILD (KD straight from the init)"),
        "smart": _order(results, "recipe", "uniform", "SMART is not worse than uniform placement"),
        "inits": _order(results, "init_new", "init_old", "the new initialisations beat the old ones"),
    }
    s["teacher_cache"] = cache_vs_online(results)
    return s


def cache_vs_online(results: dict) -> dict:
    """The kd_cache run's KD hybrid against the recipe's (online KD, same layers and token budget): the relative
    difference of each held-out metric, and whether all are within CACHE_REL_TOL."""
    out = {"claim": f"KD from the teacher cache is within {100 * CACHE_REL_TOL:.0f}% (relative) of online KD"}
    for key in ("kl_text", "ppl_text", "kl_sft", "ppl_sft"):
        online, cache = _kd_value(results, "recipe", key), _kd_value(results, "kd_cache", key)
        if _ok(online) and _ok(cache) and online:
            out[key] = {"online": online, "cache": cache, "relative": (cache - online) / online}
    if "kl_text" in out and "ppl_text" in out:
        out["holds"] = all(abs(v["relative"]) <= CACHE_REL_TOL for k, v in out.items() if isinstance(v, dict))
    return out


# ------------------------------------------------------------------------------------------------ text
def _f(x, digits=3):
    if not _ok(x):
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.{digits}f}"


def run_line(res: dict) -> str:
    m = res.get("models", {}).get(final_model(res) or "", {})
    return (f"{final_model(res)}: heldout.txt ppl {_f(m.get('ppl_text'))} KL {_f(m.get('kl_text'))}, "
            f"sft ppl {_f(m.get('ppl_sft'))} KL {_f(m.get('kl_sft'))}, {m.get('tokens_trained', 0):,} tokens, "
            f"{res.get('train_seconds')} s training")


def table(results: dict) -> str:
    t = teacher_row(results) or {}
    tp = t.get("ppl_text")
    head = ["run", "model", "tokens trained", "wall s", "KV", "ppl heldout.txt", "x teacher", "KL heldout.txt",
            "ppl sft held-out", "KL sft held-out"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, res in results.get("runs", {}).items():
        if "models" not in res:
            why = res.get("skipped") or res.get("error") or "?"
            lines.append(f"| {run} | ({'skipped' if 'skipped' in res else 'error'}: {why}) |" + " |" * (len(head) - 2))
            continue
        for name in sorted(res["models"], key=lambda n: MODEL_ORDER.index(n) if n in MODEL_ORDER else 99):
            if name == "teacher" and run != "recipe":
                continue
            m = res["models"][name]
            ratio = m["ppl_text"] / tp if _ok(m.get("ppl_text")) and _ok(tp) else None
            lines.append("| " + " | ".join([
                run, name, f"{m.get('tokens_trained', 0):,}" if name != "teacher" else "-",
                _f(m.get("wall_seconds"), 1) if name != "teacher" else "-", f"{100 * m['kv_fraction']:.2f}%",
                _f(m.get("ppl_text")), _f(ratio, 2), _f(m.get("kl_text"), 4), _f(m.get("ppl_sft")),
                _f(m.get("kl_sft"), 4)]) + " |")
    return "\n".join(lines)


def verdict(results: dict) -> str:
    s = results.get("summary") or summary(results)
    out = [f"targets on heldout.txt: ppl <= {TARGET_PPL_RATIO}x the teacher's, KL <= {TARGET_KL} nats per token"]
    for name in ("kd", "dpo"):
        r = s.get(f"recipe_{name}")
        if r:
            out.append(f"  recipe {name}: ppl {_f(r['ppl_text'])} = {r['ppl_ratio']:.2f}x the teacher's "
                       f"({'met' if r['meets_ppl_target'] else 'NOT met'}), KL {_f(r['kl_text'], 4)} "
                       f"({'met' if r['meets_kl_target'] else 'NOT met'}), KV {100 * r['kv_fraction']:.2f}%, "
                       f"{r['tokens_trained']:,} tokens, {r['wall_seconds']} s of stages")
    for key, a in (s.get("ablations") or {}).items():
        if "holds" not in a:
            out.append(f"  {a['claim']}: not measured")
            continue
        k = a["kl_text"]
        (better, kb), (worse, kw) = [(n, v) for n, v in k.items() if n != "difference"]
        out.append(f"  {a['claim']}: {'holds' if a['holds'] else 'does NOT hold'} (KD KL on heldout.txt "
                   f"{better} {_f(kb, 4)} vs {worse} {_f(kw, 4)}, difference {k['difference']:+.4f})")
    c = s.get("teacher_cache") or {}
    if "holds" in c:
        diffs = ", ".join(f"{k} {v['online']:.4g} -> {v['cache']:.4g} ({100 * v['relative']:+.1f}%)"
                          for k, v in c.items() if isinstance(v, dict))
        out.append(f"  {c['claim']}: {'holds' if c['holds'] else 'does NOT hold'} (online -> cache: {diffs})")
    elif c:
        out.append(f"  {c['claim']}: not measured")
    curve = results.get("curve") or {}
    if curve.get("points"):
        last = curve["points"][-1]
        state = "complete" if curve.get("complete") else "to be resumed"
        out.append(f"  curve: {len(curve['points'])} points up to {last['tokens']:,} KD tokens, last ppl "
                   f"{_f(last['perplexity'])} KL {_f(last['kl_to_teacher'], 4)} ({state})")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ plot
def plot(results: dict, out_png) -> str | None:
    """KL on heldout.txt and perplexity relative to the teacher per model and run; the curve when there is one."""
    from zebra.eval.plots import _plt, save_figure

    bars = [(f"{run}\n{name}", m) for run, res in results.get("runs", {}).items()
            for name, m in (res.get("models") or {}).items() if name != "teacher" and _ok(m.get("kl_text"))]
    if not bars:
        return None
    t = teacher_row(results) or {}
    curve = (results.get("curve") or {}).get("points") or []
    plt = _plt()
    fig, axes = plt.subplots(1, 3 if curve else 2, figsize=(16 if curve else 12, 4.5))
    labels = [b[0] for b in bars]
    x = range(len(bars))
    axes[0].bar(x, [m["kl_text"] for _, m in bars], color="tab:blue")
    axes[0].axhline(TARGET_KL, color="tab:red", ls="--", label=f"target {TARGET_KL}")
    axes[0].set_ylabel("KL(teacher || model), nats per token")
    axes[0].set_title("heldout.txt")
    ratios = [m["ppl_text"] / t["ppl_text"] if _ok(t.get("ppl_text")) else float("nan") for _, m in bars]
    axes[1].bar(x, ratios, color="tab:orange")
    axes[1].axhline(TARGET_PPL_RATIO, color="tab:red", ls="--", label=f"target {TARGET_PPL_RATIO}x")
    if max((r for r in ratios if _ok(r)), default=1.0) > 3:  # the untrained hybrids sit orders of magnitude off
        axes[1].set_yscale("log")
    axes[1].set_ylabel("perplexity / teacher's")
    axes[1].set_title(f"heldout.txt (teacher ppl {_f(t.get('ppl_text'))})")
    for ax in axes[:2]:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    if curve:
        ax = axes[2]
        ax.plot([p["tokens"] for p in curve], [p["perplexity"] for p in curve], marker="o", label="KD hybrid")
        if _ok(t.get("ppl_text")):
            ax.axhline(TARGET_PPL_RATIO * t["ppl_text"], color="tab:red", ls="--", label="1.5x teacher")
            ax.axhline(t["ppl_text"], color="tab:green", ls=":", label="teacher")
        ax.set_xscale("symlog")
        ax.set_yscale("log")
        ax.set_xlabel("KD tokens")
        ax.set_ylabel("perplexity on heldout.txt")
        ax.legend(fontsize=8)
    return save_figure(fig, out_png)
