"""data=teacher_generated: the sampler against cache-free float64 references, and the teacher_data stage end to end
on a tiny random teacher (the corpus written once, ILD and KD trained on it, reused by the next run)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers.configs import compose_cfg
from zebra.data.synthetic import write_preferences
from zebra.data.teacher_samples import SamplingSettings, filtered_logits, prompt_conversations, sample_batch


def _reference_filter(logits: list[float], temperature: float, top_k: int, top_p: float) -> set[int]:
    """Kept tokens by the definitions: the k largest, then the smallest most-likely set whose mass reaches top_p."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = order[:top_k] if top_k else order
    z = sum(math.exp(scaled[i]) for i in kept)
    out, mass = [], 0.0
    for i in kept:
        out.append(i)
        mass += math.exp(scaled[i]) / z
        if mass >= top_p:
            break
    return set(out)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 0.8), (1.0, 3, 1.0),
                                                     (0.5, 0, 0.3)])
def test_filtered_logits_match_definition(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 12, generator=g, dtype=torch.float64) * 2
    out = filtered_logits(logits, SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p))
    for row, got in zip(logits.tolist(), out):
        keep = _reference_filter(row, temperature, top_k, top_p)
        assert set(torch.isfinite(got).nonzero().flatten().tolist()) == keep
        kept = torch.tensor(sorted(keep))
        torch.testing.assert_close(got[kept], torch.tensor(row, dtype=torch.float64)[kept] / temperature)


@pytest.fixture(scope="module")
def llama64():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


def _greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    """Cache-free and unpadded: the whole sequence through the model at every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_left_padded_cached_batch_equals_each_prompt_alone(llama64):
    prompts = [[5, 9, 11, 3, 7, 2], [4], [8, 8, 1]]
    s = SamplingSettings(temperature=0.0, max_new_tokens=7)
    got = sample_batch(llama64, prompts, s, pad_id=0, stop_ids=(), generator=torch.Generator())
    for p, (new, stopped) in zip(prompts, got):
        assert new == _greedy_reference(llama64, p, 7) and not stopped


def test_rows_stop_at_their_stop_token(llama64):
    prompts = [[5, 9, 11], [4, 2]]
    refs = [_greedy_reference(llama64, p, 6) for p in prompts]
    stop = refs[0][2]  # the first row emits it at its third step
    got = sample_batch(llama64, prompts, SamplingSettings(temperature=0.0, max_new_tokens=6), pad_id=0,
                       stop_ids=(stop,), generator=torch.Generator())
    assert got[0] == (refs[0][:3], True)
    end = next((i + 1 for i, t in enumerate(refs[1]) if t == stop), None)
    assert got[1] == ((refs[1][:end], True) if end else (refs[1], False))


def test_sampling_is_seeded_per_batch(llama64):
    s = SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=5)
    draw = [sample_batch(llama64, [[3, 4]] * 4, s, pad_id=0, stop_ids=(), generator=torch.Generator().manual_seed(k))
            for k in (1, 1, 2)]
    assert draw[0] == draw[1] and draw[0] != draw[2]
    assert len({tuple(r[0]) for r in draw[0]}) > 1  # rows of one batch differ


def test_prompts_are_the_turns_before_the_first_reply(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                          {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]},
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prompt_conversations({"path": str(src)}, cache_dir=tmp_path / "c") == [rows[0]["messages"][:2]]
    with pytest.raises(ValueError, match="no conversation that starts with a user turn"):
        prompt_conversations({"path": str(src)}, limit=0, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="chat source"):
        prompt_conversations({"path": "shipped:heldout"})


# ------------------------------------------------------------------------------------------------ the stage
def _overrides(root, prefs, *extra):
    return ["model=tiny", "data=teacher_generated", "logger=csv", f"paths.root={root}",
            "trainer.enable_progress_bar=false", f"data.preference.source=[{{path: '{prefs}'}}]",
            "data.generate.max_prompts=12", "data.generate.free_samples=4", "data.generate.max_new_tokens=12",
            "data.generate.batch_size=8", "data.sft.heldout_fraction=0.1", "mix=uniform", "mix.n_mla=2",
            "stage.order=[]",
            "ilkd.seq_len=32", "ilkd.batch_size=2", "ilkd.tokens=128", "ilkd.checkpoint_every_n_steps=0",
            "kd.seq_len=32", "kd.batch_size=2", "kd.tokens=128", "kd.checkpoint_every_n_steps=0",
            "kd.heldout_batches=1", *extra]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The pipeline with no stage of its own: data=teacher_generated puts teacher_data first."""
    from zebra.stages.run import run

    root = tmp_path_factory.mktemp("teacher_generated")
    prefs = write_preferences(root / "prefs.jsonl")
    summary = run(compose_cfg(_overrides(root, prefs)))
    return root, prefs, summary


def test_corpus_written_whole(generated):
    import datasets

    root, _, summary = generated
    assert list(summary)[:1] == ["teacher_data"] and not summary["teacher_data"]["skipped"]
    stage = root / "tiny" / "teacher_data"
    corpus = datasets.load_from_disk(str(stage / "dataset"))
    assert len(corpus["responses"]) == 12 and len(corpus["free"]) == 4
    reply = corpus["responses"][0]["messages"]
    assert [m["role"] for m in reply][-2:] == ["user", "assistant"]
    assert all(r["new_tokens"] == 12 and r["text"].startswith("<|im_start|>") for r in corpus["free"])
    report = json.loads((stage / "report.json").read_text())
    assert report["new_tokens"] == sum(corpus["responses"]["new_tokens"]) + 4 * 12
    assert report["tokens_per_second"] > 0 and report["settings"]["top_p"] == 0.95
    assert not list(stage.glob(".*")), "temporary directories left behind"


def test_second_run_reuses_the_corpus(generated):
    from zebra.stages.run import run

    root, prefs, _ = generated
    data = root / "tiny" / "teacher_data" / "dataset"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in data.rglob("*"))
    summary = run(compose_cfg(_overrides(root, prefs)))
    assert summary["teacher_data"]["skipped"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in data.rglob("*")) == before


def test_other_settings_regenerate(generated):
    from zebra.stages import artifacts

    root, prefs, _ = generated
    assert artifacts.is_done(compose_cfg(_overrides(root, prefs)), "teacher_data")
    for change in ("data.generate.temperature=0.5", "data.generate.max_new_tokens=10", "model.teacher=random:1",
                   "data.generate.prompts.path=shipped:preferences"):
        assert not artifacts.is_done(compose_cfg(_overrides(root, prefs, change)), "teacher_data"), change


@pytest.mark.slow
def test_ilkd_and_kd_train_on_the_corpus(generated):
    from zebra.stages import artifacts
    from zebra.stages.run import run

    root, prefs, _ = generated
    summary = run(compose_cfg(_overrides(root, prefs, "stage.order=[ilkd,kd]")))
    assert summary["teacher_data"]["skipped"] and not summary["ilkd"]["skipped"] and not summary["kd"]["skipped"]
    for d in ("ilkd", "2mla-uniform/kd"):
        rep = json.loads((root / "tiny" / d / "report.json").read_text())
        assert rep["tokens_seen"] > 0 and rep["loss_last"] is not None
    # the students' hash chains the corpus's: other sampling settings mean other students
    cfg = compose_cfg(_overrides(root, prefs, "stage.order=[ilkd,kd]"))
    assert artifacts.is_done(cfg, "ilkd") and artifacts.is_done(cfg, "kd")
    assert not artifacts.is_done(compose_cfg(_overrides(root, prefs, "data.generate.temperature=0.5")), "ilkd")


def test_bad_settings_fail_before_the_teacher_loads(tmp_path):
    from zebra.stages.errors import StageError
    from zebra.stages.teacher_data import run

    prefs = write_preferences(tmp_path / "prefs.jsonl")
    for bad, match in (("data.generate.top_p=0", "top_p must be in"),
                       ("data.generate.temperature=-1", "temperature must be >= 0"),
                       ("data.generate.free_samples=-1", "free_samples >= 0")):
        with pytest.raises(StageError, match=match):
            run(compose_cfg(_overrides(tmp_path, prefs, bad)))
    with pytest.raises(StageError, match="use data=teacher_generated"):
        run(compose_cfg(["model=tiny", f"paths.root={tmp_path}"]))
    assert not (tmp_path / "tiny").exists()


# ------------------------------------------------------------------------------------------------ on the GPU
@pytest.mark.gpu
def test_gpu_batch_equals_cpu_reference(llama64):
    model = LlamaForCausalLM(llama64.config).to(torch.float32)
    model.load_state_dict(llama64.state_dict())
    prompts = [[5, 9, 11, 3, 7, 2], [4], [8, 8, 1]]
    got = sample_batch(model.cuda().eval(), prompts, SamplingSettings(temperature=0.0, max_new_tokens=6), pad_id=0,
                       stop_ids=(), generator=torch.Generator(device="cuda"))
    assert [new for new, _ in got] == [_greedy_reference(llama64, p, 6) for p in prompts]


@pytest.mark.gpu
def test_gpu_stage_on_the_embedded_teacher(tmp_path):
    """The embedded teacher on the GPU in bf16: prints the sampling throughput the report records."""
    from zebra.stages.run import run

    prefs = write_preferences(tmp_path / "prefs.jsonl")
    overrides = [o for o in _overrides(tmp_path, prefs) if not o.startswith(("model=", "data.generate."))]
    cfg = compose_cfg(overrides + ["data.generate.max_prompts=64", "data.generate.free_samples=64",
                                   "data.generate.max_new_tokens=128", "data.generate.batch_size=128"])
    run(cfg)
    report = json.loads((tmp_path / "smollm2_135m" / "teacher_data" / "report.json").read_text())
    print("teacher_data on", torch.cuda.get_device_name(), {k: report[k] for k in (
        "responses", "free_samples", "new_tokens", "sampling_seconds", "tokens_per_second", "finished_fraction")})
    assert report["device"].startswith("cuda") and report["dtype"] == "bfloat16"
    assert report["responses"] == 64 and report["free_samples"] == 64 and report["new_tokens"] >= 64 * 128
