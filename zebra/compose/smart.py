"""SMART layer sensitivities (METHOD.md §5) and the stage's outputs; the choice of MLA positions from them is
zebra.plan.selection.select_layers.

Sensitivity of layer i: s_i = KL(base || all-Mamba2) - KL(base || all-Mamba2 with layer i replaced by the
ILD'd MLA layer i), forward KL over next-token distributions averaged per counted token.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from zebra.eval.metrics import counted_positions, eval_mode, forward_inputs, kl_sum, log_probs_at, selected_log_probs


# ----------------------------------------------------------------------------------------------------------------
# sensitivities
# ----------------------------------------------------------------------------------------------------------------
@contextmanager
def swapped_layer(target, donor, index: int):
    """Temporarily put `donor`'s decoder layer `index` into `target` (no copy: the module is shared)."""
    layers = target.model.layers
    original, original_type = layers[index], target.config.hybrid_layer_types[index]
    layers[index] = donor.model.layers[index]
    target.config.hybrid_layer_types[index] = donor.config.hybrid_layer_types[index]
    try:
        yield target
    finally:
        layers[index] = original
        target.config.hybrid_layer_types[index] = original_type


@torch.no_grad()
def layer_sensitivities(base_model, mamba_student, mla_student, batches, log=None) -> list[float]:
    """s_i = KL(base || all-Mamba2) - KL(base || all-Mamba2 with layer i from the MLA student), per token.

    `batches`: token-mixture batches (input_ids, position_ids, loss_mask, attention_mask; as zebra.data.sft).
    The base gets the same block-causal/padding view as the students. Layers are swapped into the Mamba2
    student in place, one at a time (L + 2 forwards per batch, no model copies), so the two students must sit
    on the same device. All three models run in eval mode; their previous modes are restored.
    """
    num_layers = mamba_student.config.num_hidden_layers
    if mla_student.config.num_hidden_layers != num_layers or base_model.config.num_hidden_layers != num_layers:
        raise ValueError("base, all-Mamba2 and all-MLA models must have the same number of layers")
    full, swapped, tokens = 0.0, [0.0] * num_layers, 0
    with eval_mode(base_model, mamba_student, mla_student):
        for b, batch in enumerate(batches):
            positions = counted_positions(batch)
            if not positions.any():
                continue
            tokens += int(positions.sum())
            logp_base = selected_log_probs(base_model, batch, positions)
            # One all-Mamba2 pass keeps the hidden state entering every layer; swapping layer i changes nothing
            # below it, so each swapped pass restarts at layer i (about half the work of L full passes).
            kwargs = forward_inputs(mamba_student, batch)
            out = mamba_student.model(**kwargs, output_hidden_states=True)
            full += kl_sum(logp_base, log_probs_at(mamba_student, out.last_hidden_state, positions))
            del kwargs["input_ids"]
            for i in range(num_layers):
                with swapped_layer(mamba_student, mla_student, i):
                    hidden = mamba_student.model(inputs_embeds=out.hidden_states[i], start_layer=i,
                                                 **kwargs).last_hidden_state
                    swapped[i] += kl_sum(logp_base, log_probs_at(mamba_student, hidden, positions))
            if log is not None:
                log(f"smart: batch {b} done ({tokens} tokens so far)")
    if tokens == 0:
        raise ValueError("layer_sensitivities: the calibration batches hold no counted tokens")
    return [(full - s) / tokens for s in swapped]


# ----------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------
def write_smart_outputs(out_dir, scores, selections: dict, extra: dict | None = None) -> dict:
    """Write `sensitivity.json` (scores, selections {n: indices}) and `sensitivity.png` (a bar chart per
    selection, chosen layers highlighted) into `out_dir`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = [float(s) for s in scores]
    selections = {int(n): [int(i) for i in idx] for n, idx in selections.items()}
    payload = {"num_layers": len(scores), "scores": scores,
               "selections": {str(n): idx for n, idx in sorted(selections.items())}, **(extra or {})}
    json_path = out / "sensitivity.json"
    json_path.write_text(json.dumps(payload, indent=1))

    rows = sorted(selections.items()) or [(0, [])]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6, 0.3 * len(scores) + 2), 2.6 * len(rows)),
                             squeeze=False, sharex=True)
    for ax, (n, idx) in zip(axes[:, 0], rows):
        chosen = set(idx)
        colours = ["tab:red" if i in chosen else "tab:gray" for i in range(len(scores))]
        ax.bar(range(len(scores)), scores, color=colours)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel("s_i (nats/token)")
        ax.set_title(f"SMART: {n} MLA layers {idx}" if n else "SMART layer sensitivity")
    axes[-1, 0].set_xlabel("layer")
    axes[-1, 0].set_xticks(range(len(scores)))
    fig.tight_layout()
    png_path = out / "sensitivity.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return {"json": str(json_path), "png": str(png_path)}
