"""SMART (METHOD §5): the selection rule against brute force and the released layer lists; sensitivities against
an explicit computation with assembled hybrids; outputs."""

import itertools
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from zebra.compose.smart import layer_sensitivities, write_smart_outputs
from zebra.plan.selection import select_layers, terminal_layers
from zebra.compose.students import assemble_hybrid, build_student


def endpoints(scores, n):
    """METHOD §5 step 1, written independently (plus the documented fallback when the windows crowd)."""
    L = len(scores)
    w = math.ceil(L / n)
    first = max(range(w), key=lambda i: (scores[i], -i))
    last = max(range(L - w, L), key=lambda i: (scores[i], -i))
    if last - first < n - 1:
        last = max(range(max(L - w, first + n - 1), L), key=lambda i: (scores[i], -i))
    return first, last


def brute_force(scores, n):
    """All placements with the fixed endpoints and gaps in {floor(g), ceil(g)}: (best sum, all optimal lists)."""
    first, last = endpoints(scores, n)
    g = (last - first) / (n - 1)
    gap_set = sorted({math.floor(g), math.ceil(g)})
    placements = []
    for gaps in itertools.product(gap_set, repeat=n - 1):
        if sum(gaps) != last - first:
            continue
        idx = [first]
        for gap in gaps:
            idx.append(idx[-1] + gap)
        placements.append(idx)
    assert placements
    sums = [sum(scores[i] for i in p) for p in placements]
    best = max(sums)
    return best, sorted(p for p, s in zip(placements, sums) if s >= best - 1e-9), gap_set


def test_dp_equals_brute_force_random():
    rng = random.Random(0)
    cases = 0
    for L in range(2, 13):
        for n in range(2, L):
            for trial in range(6):
                if trial % 2:
                    scores = [rng.gauss(0, 1) for _ in range(L)]
                else:
                    scores = [float(rng.randint(0, 3)) for _ in range(L)]  # many ties
                chosen = select_layers(scores, n)
                best, optimal, gap_set = brute_force(scores, n)
                assert len(chosen) == n == len(set(chosen))
                assert (chosen[0], chosen[-1]) == endpoints(scores, n)
                assert all(b - a in gap_set for a, b in zip(chosen, chosen[1:]))
                assert sum(scores[i] for i in chosen) == pytest.approx(best, abs=1e-9)
                assert chosen == optimal[0]  # ties: the lexicographically smallest optimal list
                cases += 1
    assert cases > 300


def peaked(L, peaks):
    return [1.0 if i in peaks else 0.0 for i in range(L)]


@pytest.mark.parametrize("L,n,released", [
    (16, 4, [0, 5, 10, 14]),
    (28, 6, [0, 5, 10, 16, 21, 26]),
    (32, 8, [0, 4, 8, 12, 16, 20, 25, 30]),
])
def test_released_lists(L, n, released):
    assert select_layers(peaked(L, released), n) == released
    # also with a smooth background under the peaks
    rng = random.Random(L)
    noisy = [s + 0.01 * rng.random() for s in peaked(L, released)]
    assert select_layers(noisy, n) == released


def test_edge_counts():
    scores = [0.1, 0.5, 0.3, 0.9, 0.2]
    assert select_layers(scores, 1) == [3]
    assert select_layers([1.0, 1.0, 0.0], 1) == [0]  # ties to the lower index
    assert select_layers(scores, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="6 MLA layers from a 5-layer"):
        select_layers(scores, 6)
    with pytest.raises(ValueError, match="positive integer"):
        select_layers(scores, 0)
    with pytest.raises(ValueError, match="finite"):
        select_layers([0.1, float("nan"), 0.2], 2)


def test_crowded_windows_fallback():
    # L=5, N=4: windows [0,2) and [3,5); first=1, last=3 would leave no room for 4 distinct layers
    scores = [0.0, 1.0, 0.0, 1.0, 0.0]
    assert terminal_layers(scores, 4) == (1, 4)
    assert select_layers(scores, 4) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------------------------
# sensitivities
# ---------------------------------------------------------------------------------------------------------------
def full_kl(base, model, ids):
    """mean over all but the last position of KL(base || model), from full logits (no masks)."""
    with torch.no_grad():
        lp = F.log_softmax(base(ids).logits[:, :-1].double(), -1)
        lq = F.log_softmax(model(ids).logits[:, :-1].double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def test_sensitivities_equal_explicit_hybrids(tiny_llama):
    base = tiny_llama(g=2, layers=4)
    kwargs = {"q_lora_rank": 24, "kv_lora_rank": 12}
    mla, _ = build_student(base, kwargs, "mla")
    mamba, _ = build_student(base, kwargs, "mamba")
    torch.manual_seed(1)
    ids = torch.randint(3, 97, (2, 16))
    batches = [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}]  # equal sizes: per-token mean == mean of means
    before = {k: v.clone() for k, v in mamba.state_dict().items()}
    scores = layer_sensitivities(base, mamba, mla, batches)

    reference_full = full_kl(base, mamba, ids)
    for i in range(4):
        hybrid = assemble_hybrid(mla, mamba, [i])
        assert scores[i] == pytest.approx(reference_full - full_kl(base, hybrid, ids), rel=1e-8, abs=1e-12)
    # the Mamba2 student is left as it was: same modules, same weights, same layer types
    assert all(l.layer_type == "mamba" for l in mamba.model.layers)
    assert mamba.config.hybrid_layer_types == ["mamba"] * 4
    after = mamba.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sensitivities_packed_and_padded_batches(tiny_llama):
    """A packed row (two documents) with a padded tail scores exactly as the documents run one by one."""
    base = tiny_llama(g=2, layers=3)
    mla, _ = build_student(base, {"q_lora_rank": 24, "kv_lora_rank": 12}, "mla")
    mamba, _ = build_student(base, {"q_lora_rank": 24, "kv_lora_rank": 12}, "mamba")
    torch.manual_seed(2)
    doc_a, doc_b = torch.randint(3, 97, (1, 7)), torch.randint(3, 97, (1, 6))
    pad = torch.zeros(1, 3, dtype=torch.long)
    ids = torch.cat([doc_a, doc_b, pad], 1)
    position_ids = torch.cat([torch.arange(7), torch.arange(6), torch.arange(6, 9)])[None]
    attention_mask = torch.cat([torch.ones(1, 13), torch.zeros(1, 3)], 1).long()
    loss_mask = torch.zeros(1, 16, dtype=torch.bool)
    loss_mask[0, 0:6] = True  # doc a: positions predicting its own next token
    loss_mask[0, 7:12] = True
    packed = [{"input_ids": ids, "position_ids": position_ids, "attention_mask": attention_mask,
               "loss_mask": loss_mask}]
    separate = [{"input_ids": doc_a}, {"input_ids": doc_b}]
    got = layer_sensitivities(base, mamba, mla, packed)
    expected = layer_sensitivities(base, mamba, mla, separate)
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-12)


def test_write_outputs(tmp_path):
    scores = [0.3, 0.1, 0.2, 0.05, 0.4, 0.0]
    sel = {2: select_layers(scores, 2), 3: select_layers(scores, 3)}
    paths = write_smart_outputs(tmp_path / "smart", scores, sel)
    data = json.loads((tmp_path / "smart" / "sensitivity.json").read_text())
    assert data["scores"] == scores
    assert data["selections"] == {"2": sel[2], "3": sel[3]}
    png = (tmp_path / "smart" / "sensitivity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].endswith("sensitivity.png")
