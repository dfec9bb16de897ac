"""Calibration statistics from the base on a few token rows, for the initialisations that use activations.

- `attention_input_covariances`: per layer, C = E[x x^T] of the attention's input (the input RMSNorm's output,
  what q/k/v_proj read), in float64: the weighting of the activation-aware SVD (init_mla.py).
- `match_mamba_output_scales`: per layer, the factor that gives an attention-initialised Mamba2 mixer the RMS of
  the attention output it replaces, on the same inputs (the base's own), applied to its out_proj.
- `calibration_rows`: a data module's (packed, padded) batches cut into one row per document, as the base sees
  a document alone (no cross-document attention to mask).

Rows are dicts {"input_ids": [1, n]} (zebra.compose.report.token_rows makes them from text).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

INIT_OPTIONS = {"mla_svd": ("plain", "activation_aware"), "mamba_conv": ("default", "identity"),
                "mamba_scale": ("none", "matched")}
# what a library call without options gets: the plain initialisation (the configured default: conf/init/)
PLAIN_INIT = {"mla_svd": "plain", "calibration_rows": 0, "mamba_conv": "default", "mamba_scale": "none"}


def check_init_options(init: dict | None, from_config: bool = False) -> dict:
    """The init options (conf/init/) completed with the plain ones (PLAIN_INIT) and checked; ValueError names a
    bad key. `from_config`: the options will pick their own calibration rows, so `calibration_rows` must be > 0 where an
    option needs them."""
    out = dict(PLAIN_INIT)
    unknown = sorted(set(init or {}) - set(out))
    if unknown:
        raise ValueError(f"unknown init option(s) {unknown}; known: {sorted(out)}")
    out.update(init or {})
    for key, allowed in INIT_OPTIONS.items():
        if out[key] not in allowed:
            raise ValueError(f"init.{key} must be one of {list(allowed)}, got {out[key]!r}")
    rows = out["calibration_rows"]
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"init.calibration_rows must be an integer >= 0, got {rows!r}")
    if from_config and needs_calibration(out) and rows == 0:
        raise ValueError(f"init.mla_svd={out['mla_svd']} / init.mamba_scale={out['mamba_scale']} need calibration "
                         "rows: set init.calibration_rows > 0")
    return out


def needs_calibration(init: dict) -> bool:
    return init["mla_svd"] == "activation_aware" or init["mamba_scale"] == "matched"


def calibration_rows(batches: Iterable[dict], n_rows: int | None = None, min_tokens: int = 2) -> list[dict]:
    """Up to `n_rows` (None: all) single-document rows from batches of input_ids [B, T] (+ optional attention_mask, and
    position_ids that restart at 0 where a packed document starts). Pads are dropped."""
    rows: list[dict] = []
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        pos = batch.get("position_ids")
        for b in range(ids.shape[0]):
            keep = mask[b].bool() if mask is not None else torch.ones_like(ids[b], dtype=torch.bool)
            starts = [0]
            if pos is not None:
                starts = [int(i) for i in torch.nonzero(pos[b] == 0).flatten()] or [0]
                if starts[0] != 0:
                    starts = [0] + starts
            bounds = starts + [ids.shape[1]]
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                doc = ids[b, lo:hi][keep[lo:hi]]
                if doc.numel() >= min_tokens:
                    rows.append({"input_ids": doc[None].clone()})
                    if len(rows) == n_rows:
                        return rows
    return rows


def layer_kinds(config) -> list[str]:
    """Each layer's mixer kind ("mla" | "mamba"), from either name of the config field."""
    kinds = getattr(config, "hybrid_layer_types", None)
    return list(kinds if kinds is not None else config.layer_types)


def _attention_modules(base) -> list:
    return [layer.self_attn for layer in base.model.layers]


@torch.no_grad()
def attention_input_covariances(base, rows: list[dict]) -> list[torch.Tensor]:
    """Per layer of the Llama `base`: E[x x^T] [H, H] (float64) over every token of `rows` of the input that its
    attention's q/k/v projections read."""
    if not rows:
        raise ValueError("no calibration rows to collect input covariances from")
    attns = _attention_modules(base)
    hidden = base.config.hidden_size
    device = base.model.embed_tokens.weight.device
    sums = [torch.zeros(hidden, hidden, dtype=torch.float64, device=device) for _ in attns]
    count = [0]

    def hook(i):
        def grab(_module, args):
            x = args[0].reshape(-1, hidden).double()
            sums[i].addmm_(x.T, x)
        return grab

    handles = [attn.q_proj.register_forward_pre_hook(hook(i)) for i, attn in enumerate(attns)]
    try:
        for row in rows:
            ids = row["input_ids"].to(device)
            base.model(input_ids=ids)
            count[0] += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [s / count[0] for s in sums]


@torch.no_grad()
def match_mamba_output_scales(base, student, rows: list[dict], apply: bool = True) -> list[float]:
    """Per layer: sqrt(sum ||a||^2 / sum ||m||^2) over the tokens of `rows`, with a the base attention's output
    and m the student's Mamba2 mixer output on the same (base) input; with `apply`, each mixer's out_proj is
    multiplied by its factor (then its output has the attention's RMS on these rows). Layers of the student that
    are not Mamba2 get 1.0 and are left alone."""
    if not rows:
        raise ValueError("no calibration rows to match the Mamba2 output scale on")
    attns = _attention_modules(base)
    layers = student.model.layers
    if len(layers) != len(attns):
        raise ValueError(f"student has {len(layers)} layers, the base {len(attns)}")
    kinds = layer_kinds(student.config)
    device = base.model.embed_tokens.weight.device
    attn_sq = [0.0] * len(attns)
    mamba_sq = [0.0] * len(attns)

    def pre(i):
        def run_mixer(_module, args):
            if kinds[i] == "mamba":
                mixer = layers[i].mixer
                y = mixer(args[0].to(mixer.out_proj.weight.dtype))
                mamba_sq[i] += float(y.double().square().sum())
        return run_mixer

    def post(i):
        def grab(_module, _args, out):
            attn_sq[i] += float(out.double().square().sum())
        return grab

    handles = [attn.q_proj.register_forward_pre_hook(pre(i)) for i, attn in enumerate(attns)]
    handles += [attn.o_proj.register_forward_hook(post(i)) for i, attn in enumerate(attns)]
    try:
        for row in rows:
            base.model(input_ids=row["input_ids"].to(device))
    finally:
        for h in handles:
            h.remove()
    scales = []
    for i, kind in enumerate(kinds):
        if kind != "mamba":
            scales.append(1.0)
            continue
        if mamba_sq[i] <= 0 or not math.isfinite(mamba_sq[i]):
            raise ValueError(f"layer {i}: the Mamba2 mixer's output is zero or non-finite on the calibration rows")
        scales.append(math.sqrt(attn_sq[i] / mamba_sq[i]))
    if apply:
        for i, scale in enumerate(scales):
            if kinds[i] == "mamba":
                layers[i].mixer.out_proj.weight.mul_(scale)
    return scales
