"""The quality benchmark (benchmarks.quality): its smoke run end to end on CPU (model=tiny, a random teacher, every
run of RUNS and the curve), and the parts that decide what it reports (overrides filled from the recipe, targets,
the ablations' order)."""

import json
import math

import pytest

from benchmarks.quality import report as rp
from benchmarks.quality import run as qb
from benchmarks.quality.curve import read_curve
from benchmarks.quality.runs import BY_NAME, RUNS, NeedsRecipe, fill

SETS = ("text", "sft")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    out = d / "quality_bench.json"
    qb.main(["--smoke", "--fresh", "--curve", "--out", str(out), "--root", str(d / "artifacts")])
    return d, json.loads(out.read_text())


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_every_row_with_finite_numbers(smoke):
    d, js = smoke
    assert js["benchmark"] == "quality" and js["smoke"] is True
    runs = js["runs"]
    assert set(runs) == {r.name for r in RUNS if r.default}
    expected = {"recipe": {"teacher", "ilkd_mla", "ilkd_mamba", "assembled", "kd", "dpo"},
                "no_ild": {"teacher", "assembled", "kd"}, "uniform": {"teacher", "assembled", "kd"}}
    for run, models in expected.items():
        assert set(runs[run]["models"]) == models, run
        for name, m in runs[run]["models"].items():
            for s in SETS:
                assert _finite(m[f"ppl_{s}"]) and m[f"ppl_{s}"] > 1, (run, name, s)
                assert _finite(m[f"kl_{s}"]) and m[f"kl_{s}"] >= 0, (run, name, s)
            assert 0 <= m["kv_fraction"] <= 1
    recipe = runs["recipe"]["models"]
    assert recipe["teacher"]["kl_text"] == 0 and recipe["teacher"]["kv_fraction"] == 1
    # SMART's per-layer scores beside its choice: the chosen layers' endpoints are the argmax of their windows
    scores, chosen = runs["recipe"]["smart_scores"], runs["recipe"]["mla_layers"]
    assert len(scores) == 4 and all(_finite(x) for x in scores) and runs["recipe"]["smart_calibration_tokens"] > 0
    assert scores[chosen[0]] == max(scores[:2]) and scores[chosen[-1]] == max(scores[2:])
    assert recipe["ilkd_mamba"]["kv_fraction"] == 0 and recipe["ilkd_mla"]["kv_fraction"] > recipe["kd"]["kv_fraction"]
    # tokens add up along the stages that made each model
    ild, kd = recipe["ilkd_mla"]["tokens_trained"], recipe["kd"]["tokens_by_stage"]["kd"]
    assert ild > 0 and kd > 0 and recipe["kd"]["tokens_trained"] == ild + kd
    assert recipe["dpo"]["tokens_trained"] > recipe["kd"]["tokens_trained"]
    assert recipe["dpo"]["wall_seconds"] >= recipe["kd"]["wall_seconds"] >= recipe["assembled"]["wall_seconds"] > 0
    # no ILD: its exports are the initialised students, so it trained KD tokens only, at the recipe's layers
    no_ild = runs["no_ild"]
    assert no_ild["models"]["kd"]["tokens_trained"] == no_ild["models"]["kd"]["tokens_by_stage"]["kd"] == kd
    assert no_ild["mla_layers"] == runs["recipe"]["mla_layers"]
    assert runs["uniform"]["mla_layers"] == [0, 2]  # floor(i * L / n) for the tiny preset's 4 layers, n = 2
    for name in ("init_old", "init_new"):  # run, or skipped with the reason (the option missing, or the recipe's)
        assert "models" in runs[name] or runs[name]["skipped"], name
    # KD from the teacher cache: the recipe's ILD and layers, the same KD budget, no teacher in the KD step
    cache = runs["kd_cache"]
    assert set(cache["models"]) == {"teacher", "assembled", "kd"}
    assert cache["mla_layers"] == runs["recipe"]["mla_layers"]
    assert cache["models"]["kd"]["tokens_by_stage"] == recipe["kd"]["tokens_by_stage"]
    assert cache["teacher_cache"]["top_k"] == 64 and cache["teacher_cache"]["bytes_per_token"] == 64 * 6 + 4


@pytest.mark.slow
def test_summary_table_plot_and_curve(smoke):
    d, js = smoke
    s = js["summary"]
    assert s["targets"] == {"ppl_ratio_max": 1.5, "kl_max_nats": 0.5, "on": "heldout.txt"}
    teacher_ppl = js["runs"]["recipe"]["models"]["teacher"]["ppl_text"]
    dpo_ppl = js["runs"]["recipe"]["models"]["dpo"]["ppl_text"]
    assert s["recipe_dpo"]["ppl_ratio"] == pytest.approx(dpo_ppl / teacher_ppl)
    assert "holds" in s["ablations"]["ild"] and "holds" in s["ablations"]["smart"]
    assert "holds" in s["teacher_cache"] and s["teacher_cache"]["kl_text"]["online"] == pytest.approx(
        js["runs"]["recipe"]["models"]["kd"]["kl_text"])
    table = rp.table(js)
    for run in js["runs"]:
        assert f"| {run} |" in table
    assert (d / "quality.png").stat().st_size > 0
    curve = js["curve"]
    assert curve["complete"]
    points = curve["points"]
    assert len(points) >= 3 and points[0]["step"] == 0 and points[0]["tokens"] == 0
    assert [p["step"] for p in points] == sorted({p["step"] for p in points})
    assert all(_finite(p["perplexity"]) and _finite(p["kl_to_teacher"]) for p in points)
    assert points == read_curve(curve["points_file"])


def test_overrides_take_the_recipes_layers():
    run = BY_NAME["no_ild"]
    with pytest.raises(NeedsRecipe):
        fill(run.overrides, None)
    filled = fill(run.overrides, {"mla_layers": [0, 6, 12]})
    assert "mix.mla_layers=[0,6,12]" in filled and "ilkd.max_steps=1" in filled
    assert "mix.n_mla=3" in fill(BY_NAME["uniform"].overrides, {"mla_layers": [0, 6, 12]})
    # the larger-k cache runs and the tail draws: only when named, the recipe's layers and their own k and draws
    for name, k, s in (("kd_cache_k256", 256, 0), ("kd_cache_k1024", 1024, 0), ("kd_cache_tail", 64, 16)):
        run = BY_NAME[name]
        filled = fill(run.overrides, {"mla_layers": [0, 6, 12]})
        assert not run.default and f"teacher_cache.top_k={k}" in filled and "mix.mla_layers=[0,6,12]" in filled
        assert f"teacher_cache.tail_samples={s}" in filled and run.stages == ("ilkd", "teacher_cache", "kd")
    assert BY_NAME["kd_cache"].default and "teacher_cache.tail_samples=0" in BY_NAME["kd_cache"].overrides


def test_the_no_ild_scheduler_changes_no_weight():
    import torch

    from benchmarks.quality.runs import frozen_lr

    w = torch.nn.Parameter(torch.randn(4, 4))
    before = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.1)
    sched = frozen_lr(opt, total_steps=1, warmup_ratio=0.05)
    (w ** 2).sum().backward()
    opt.step()
    sched.step()
    assert torch.equal(w.detach(), before)


def _results(ppl, kl, no_ild_kl, uniform_kl):
    def row(p, k):
        return {"ppl_text": p, "kl_text": k, "ppl_sft": p, "kl_sft": k, "kv_fraction": 0.05, "tokens_trained": 10,
                "wall_seconds": 1.0}

    return {"runs": {"recipe": {"models": {"teacher": row(30.0, 0.0), "kd": row(ppl, kl), "dpo": row(ppl, kl)}},
                     "no_ild": {"models": {"kd": row(99.0, no_ild_kl)}},
                     "uniform": {"models": {"kd": row(99.0, uniform_kl)}}}}


def test_targets_and_ablation_order():
    s = rp.summary(_results(ppl=45.0, kl=0.4, no_ild_kl=0.9, uniform_kl=0.4))
    assert s["recipe_dpo"]["ppl_ratio"] == pytest.approx(1.5) and s["recipe_dpo"]["meets_ppl_target"]
    assert s["recipe_dpo"]["meets_kl_target"]
    assert s["ablations"]["ild"]["holds"] and s["ablations"]["ild"]["kl_text"]["difference"] == pytest.approx(0.5)
    assert s["ablations"]["smart"]["holds"]  # equal counts as "not worse"
    assert "holds" not in s["ablations"]["inits"]  # not measured
    s = rp.summary(_results(ppl=45.1, kl=0.51, no_ild_kl=0.3, uniform_kl=0.2))
    assert not s["recipe_dpo"]["meets_ppl_target"] and not s["recipe_dpo"]["meets_kl_target"]
    assert not s["ablations"]["ild"]["holds"] and not s["ablations"]["smart"]["holds"]
    text = rp.verdict({**_results(45.1, 0.51, 0.3, 0.2), "summary": s})
    assert "NOT met" in text and "does NOT hold" in text


def test_a_variant_equal_to_the_recipe_is_compared_as_the_recipe():
    results = _results(ppl=40.0, kl=0.3, no_ild_kl=0.9, uniform_kl=0.4)
    results["runs"]["init_new"] = {"skipped": "its initialisation is the recipe's own", "same_as": "recipe"}
    results["runs"]["init_old"] = {"models": {"kd": {"kl_text": 0.7, "kl_sft": 0.8}}}
    inits = rp.summary(results)["ablations"]["inits"]
    assert inits["holds"] and inits["kl_text"] == {"init_new": 0.3, "init_old": 0.7, "difference": pytest.approx(0.4)}


def test_cache_against_online_within_three_percent():
    results = _results(ppl=40.0, kl=0.5, no_ild_kl=0.9, uniform_kl=0.4)
    results["runs"]["kd_cache"] = {"models": {"kd": {"ppl_text": 41.0, "kl_text": 0.51, "ppl_sft": 40.0,
                                                     "kl_sft": 0.5}}}
    c = rp.summary(results)["teacher_cache"]
    assert c["holds"] and c["ppl_text"]["relative"] == pytest.approx(0.025) and c["kl_text"]["relative"] == \
        pytest.approx(0.02)
    results["runs"]["kd_cache"]["models"]["kd"]["kl_sft"] = 0.52  # one metric 4% off: does not hold
    c = rp.summary(results)["teacher_cache"]
    assert not c["holds"] and "does NOT hold" in rp.verdict(results)
    del results["runs"]["kd_cache"]
    assert "holds" not in rp.summary(results)["teacher_cache"]
