"""PNG plots next to the evaluation report (matplotlib, Agg backend: no display needed).

- `plot_loss_curves`: training curves of each stage, read from the Lightning CSV logs the stages write
  (`<stage dir>/csv/version_N/metrics.csv`, columns `train/loss`, `train/mla_loss`, `train/kl_per_token`, ...), or
  from `loss_history` in the stage's report.json when no CSV log exists (logger=none).
- `plot_smart`: the SMART sensitivity chart, redrawn by zebra.compose.smart.write_smart_outputs from the smart
  stage's sensitivity.json.
- `plot_kv_cache`: KV cache per token of the hybrid against the number of MLA layers (1..L) for model presets
  (conf/model/*.yaml), measured from HybridCache allocations (zebra.model.cache.measure_cache_bytes), next to the
  base Transformer's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_png: str | Path) -> str:
    """Lay out, write `fig` as a PNG (parent directories made) and free it; returns the path."""
    plt = _plt()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return str(out_png)


# ------------------------------------------------------------------------------------------------ loss curves
def read_metrics_csv(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{column: [(step, value), ...]} for the numeric train/* columns of a Lightning CSVLogger metrics.csv."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if step in (None, ""):
                continue
            for key, value in row.items():
                if not key or not key.startswith("train/") or key == "train/global_step" or value in (None, ""):
                    continue
                try:
                    series.setdefault(key, []).append((float(step), float(value)))
                except ValueError:
                    continue
    return series


def stage_curves(stage_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Every train/* series logged under `stage_dir` (one label per column and CSV version), else the report's
    loss_history."""
    curves = {}
    csvs = sorted(p for p in stage_dir.rglob("metrics.csv") if "model" not in p.relative_to(stage_dir).parts)
    for path in csvs:
        version = path.parent.name
        for key, pts in read_metrics_csv(path).items():
            label = key.removeprefix("train/") + (f" ({version})" if len(csvs) > 1 else "")
            curves[label] = sorted(pts)
    if not curves:
        try:
            hist = json.loads((stage_dir / "report.json").read_text()).get("loss_history") or []
        except (OSError, ValueError):
            hist = []
        if hist:
            curves["loss (report.json)"] = [(float(i), float(v)) for i, v in enumerate(hist)]
    return curves


# Logged next to the losses and worth a second axis; other train/* series (log-probs, lr, ...) stay in the CSV.
SECONDARY = ("kl_per_token", "rewards/accuracy", "rewards/margin")


def plot_loss_curves(stage_dirs: dict[str, Path], out_png: str | Path) -> str | None:
    """One panel per stage that logged something: its loss series (left axis) and KL per token / DPO reward
    accuracy and margin (right axis, dashed). Returns the PNG path, or None when no stage has curves."""
    panels = {name: stage_curves(Path(d)) for name, d in stage_dirs.items() if Path(d).is_dir()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (stage, curves) in zip(axes[0], panels.items()):
        losses = {k: v for k, v in curves.items() if "loss" in k}
        extra = {k: v for k, v in curves.items() if k.split(" (")[0] in SECONDARY}
        handles = []
        for label, pts in (losses or curves).items():
            handles += ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=1.2)
        if extra and losses:
            ax2 = ax.twinx()
            for i, (label, pts) in enumerate(extra.items()):
                handles += ax2.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=1,
                                    linestyle="--", color=f"C{len(losses) + i}")
            ax2.set_ylabel(", ".join(k.split(" (")[0] for k in extra), fontsize=8)
        ax.set_title(f"stage {stage}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(handles=handles, fontsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, out_png)


# ------------------------------------------------------------------------------------------------ SMART
def plot_smart(smart_dir: str | Path, out_dir: str | Path) -> str | None:
    """Redraw the SMART chart (scores and the selections of each N) from `<smart_dir>/sensitivity.json`."""
    from zebra.compose.smart import write_smart_outputs

    path = Path(smart_dir) / "sensitivity.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    selections = {int(n): idx for n, idx in (data.get("selections") or {}).items()}
    return write_smart_outputs(out_dir, data["scores"], selections)["png"]


# ------------------------------------------------------------------------------------------------ KV cache
def load_model_preset(path: str | Path) -> dict:
    """`name`, `base` and `mla` of a conf/model preset (other keys, with their interpolations, are not read)."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(path)
    return {"name": str(node.get("name", Path(path).stem)), "base": OmegaConf.to_container(node.base),
            "mla": OmegaConf.to_container(node.mla),
            "paper_mla_layers": OmegaConf.to_container(node.paper_mla_layers) if "paper_mla_layers" in node else None}


def kv_cache_across_mixes(preset: dict) -> dict:
    """For n_mla = 1..L (uniform placement; the cache depends only on the count): the hybrid's cache bytes per
    token (bf16, measured), its fraction of the base's, and the base's."""
    from zebra.plan.describe import zebra_config_from_preset
    from zebra.plan.mixes import layer_types_for, uniform_layers
    from zebra.model.cache import measure_cache_bytes

    num_layers = int(preset["base"]["num_hidden_layers"])
    rows = []
    for n in range(1, num_layers + 1):
        cfg = zebra_config_from_preset(preset, layer_types_for(num_layers, uniform_layers(num_layers, n)))
        c = measure_cache_bytes(cfg, dtype=torch.bfloat16)
        rows.append({"n_mla": n, "cache_bytes_per_token": c["cache_bytes_per_token"],
                     "kv_fraction": c["kv_fraction"], "cache_constant_bytes": c["cache_constant_bytes"]})
    return {"name": preset["name"], "num_layers": num_layers, "base_kv_bytes_per_token": c["base_kv_bytes_per_token"],
            "paper_n_mla": len(preset["paper_mla_layers"]) if preset.get("paper_mla_layers") else None,
            "rows": rows}


def plot_kv_cache(presets: list[str | Path] | None, out_png: str | Path, highlight: dict | None = None) -> tuple:
    """KV cache per token (KiB, bf16) against the number of MLA layers, one panel per model preset, with the base
    Transformer's as a line. `highlight`: {preset name: n_mla} to mark (e.g. the evaluated mix).
    Returns (png path, data)."""
    if presets is None:
        from zebra.utils.paths import config_dir

        presets = sorted((config_dir() / "model").glob("*.yaml"))
    data = [kv_cache_across_mixes(load_model_preset(p)) for p in presets]
    plt = _plt()
    ncols = min(3, len(data))
    nrows = -(-len(data) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(data):]:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, data):
        n = [r["n_mla"] for r in d["rows"]]
        kib = [r["cache_bytes_per_token"] / 1024 for r in d["rows"]]
        marks = {d["paper_n_mla"]: "tab:orange"} if d["paper_n_mla"] else {}
        if highlight and d["name"] in highlight:
            marks[int(highlight[d["name"]])] = "tab:red"
        ax.bar(n, kib, color=[marks.get(x, "tab:blue") for x in n])
        base = d["base_kv_bytes_per_token"] / 1024
        ax.axhline(base, color="black", linestyle="--", linewidth=1, label=f"base: {base:.1f} KiB/token")
        for x in marks:
            r = d["rows"][x - 1]
            ax.annotate(f"{100 * r['kv_fraction']:.2f}%", (x, r["cache_bytes_per_token"] / 1024), ha="center",
                        va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xlabel("MLA layers (the rest Mamba2)")
        ax.set_ylabel("KV cache per token (KiB, bf16)")
        ax.set_title(f"{d['name']} ({d['num_layers']} layers)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("KV cache per token: hybrid vs base (orange: paper mix, red: evaluated mix)", fontsize=9)
    return save_figure(fig, out_png), data
