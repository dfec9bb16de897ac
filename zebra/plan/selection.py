"""SMART's choice of MLA positions from per-layer sensitivities (METHOD.md §5); the sensitivities themselves are
measured in zebra.compose.smart.

Selection of N MLA layers out of L: fix the two terminal layers (argmax of s in the first and last windows of
ceil(L/N) layers), then among placements whose gaps are all floor or ceil of (last-first)/(N-1) take the one
with the largest total sensitivity (dynamic programming).
"""

from __future__ import annotations

import math


def _argmax(values, start: int = 0, stop: int | None = None) -> int:
    """Index of the largest value in values[start:stop]; ties go to the lower index."""
    stop = len(values) if stop is None else stop
    best = start
    for i in range(start + 1, stop):
        if values[i] > values[best]:
            best = i
    return best


def terminal_layers(scores, n: int) -> tuple[int, int]:
    """(first, last): the argmax of the scores over [0, ceil(L/N)) and over [L-ceil(L/N), L).

    Decision (METHOD is silent): when L is not a multiple of N the two windows can be so close that the argmaxes
    leave fewer than N-1 layers between them (e.g. L=5, N=4, first=1, last=3) and no placement of N distinct
    layers with gaps >= 1 exists; then `last` is the argmax over the part of its window at least N-1 past
    `first` (that part is never empty for N <= L). The released configurations never reach this case.
    """
    num_layers = len(scores)
    window = math.ceil(num_layers / n)
    first = _argmax(scores, 0, window)
    last = _argmax(scores, num_layers - window, num_layers)
    if last - first < n - 1:
        last = _argmax(scores, max(num_layers - window, first + n - 1), num_layers)
    return first, last


def allowed_gaps(first: int, last: int, n: int) -> tuple[int, ...]:
    """The gap sizes floor(g), ceil(g) with g = (last-first)/(n-1) (one size when g is an integer)."""
    span = last - first
    lo, hi = span // (n - 1), -(-span // (n - 1))
    return (lo,) if lo == hi else (lo, hi)


def select_layers(scores, n: int) -> list[int]:
    """The N MLA layer indices SMART chooses for per-layer sensitivities `scores` (METHOD §5).

    N = 1: the argmax over all layers; N = L: every layer; N > L or N < 1: ValueError. Ties between equally
    good placements go to the lexicographically smallest index list, so the result is deterministic.
    """
    scores = [float(s) for s in scores]
    num_layers = len(scores)
    if num_layers == 0:
        raise ValueError("select_layers needs at least one layer score")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"layer scores must be finite, got {scores}")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"the number of MLA layers must be a positive integer, got {n!r}")
    n = int(n)
    if n > num_layers:
        raise ValueError(f"cannot choose {n} MLA layers from a {num_layers}-layer model")
    if n == num_layers:
        return list(range(num_layers))
    if n == 1:
        return [_argmax(scores)]

    first, last = terminal_layers(scores, n)
    gaps = allowed_gaps(first, last, n)
    # best[p] = (total score, path) of the best placement of the first j+1 layers ending at position p.
    best = {first: (scores[first], [first])}
    for _ in range(n - 1):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for pos, (total, path) in best.items():
            for gap in gaps:
                p = pos + gap
                if p > last:
                    continue
                cand = (total + scores[p], path + [p])
                old = nxt.get(p)
                if old is None or cand[0] > old[0] or (cand[0] == old[0] and cand[1] < old[1]):
                    nxt[p] = cand
        best = nxt
    if last not in best:  # cannot happen: the gap sizes always tile last-first in n-1 steps
        raise RuntimeError(f"no placement from {first} to {last} with gaps {gaps}")
    return best[last][1]
