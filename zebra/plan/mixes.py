"""Which layers of a hybrid are MLA: resolve a `mix` config into a sorted list of layer indices."""

from __future__ import annotations

import json
from pathlib import Path

from zebra.plan.selection import select_layers


def uniform_layers(num_layers: int, n_mla: int) -> list[int]:
    """n_mla evenly spaced positions floor(i * L / n); n = L/2 gives the even layers of the paper's 50% mixes."""
    check_count(num_layers, n_mla)
    return sorted({(i * num_layers) // n_mla for i in range(n_mla)})


def check_count(num_layers: int, n_mla: int) -> None:
    if not isinstance(n_mla, int) or n_mla < 1:
        raise ValueError(f"mix.n_mla must be a positive integer, got {n_mla!r}")
    if n_mla > num_layers:
        raise ValueError(f"mix.n_mla={n_mla} is larger than the number of layers ({num_layers})")


def check_layers(num_layers: int, layers) -> list[int]:
    layers = [int(i) for i in layers]
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"mix.mla_layers {bad} out of range for a {num_layers}-layer model")
    if len(set(layers)) != len(layers):
        raise ValueError(f"mix.mla_layers has duplicates: {layers}")
    return sorted(layers)


def resolve_mla_layers(mix, num_layers: int, smart_file: str | Path | None = None) -> list[int]:
    """MLA layer indices for `mix` (selection: explicit | uniform | smart).

    `smart` reads the SMART stage's sensitivity.json and selects n_mla layers with its rule; it raises
    FileNotFoundError naming the file when the stage has not run.
    """
    selection = mix.get("selection", "explicit")
    if selection == "explicit":
        if mix.get("mla_layers") is None:
            raise ValueError("mix.selection=explicit needs mix.mla_layers, e.g. mix.mla_layers=[0,5,10]")
        return check_layers(num_layers, mix["mla_layers"])
    if selection == "uniform":
        return uniform_layers(num_layers, mix.get("n_mla"))
    if selection == "smart":
        check_count(num_layers, mix.get("n_mla"))
        if smart_file is None or not Path(smart_file).is_file():
            raise FileNotFoundError(
                f"mix.selection=smart needs the SMART stage's output {smart_file}; run stage=smart first "
                "(or use mix=uniform / mix=paper)")
        scores = json.loads(Path(smart_file).read_text())["scores"]
        if len(scores) != num_layers:
            raise ValueError(f"{smart_file} has {len(scores)} layer scores, the model has {num_layers} layers")
        return select_layers(scores, mix["n_mla"])
    raise ValueError(f"mix.selection must be explicit, uniform or smart, got {selection!r}")


def layer_types_for(num_layers: int, mla_layers: list[int]) -> list[str]:
    chosen = set(mla_layers)
    return ["mla" if i in chosen else "mamba" for i in range(num_layers)]
