"""The training benchmark's smoke run on CPU: same code path as the GPU run, tiny shapes (benchmarks.training)."""

import json

import pytest
import torch

from zebra.plan import flops as F
from benchmarks.harness import is_oom
from benchmarks.training import models
from benchmarks.training import run as tb


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "training_bench.json"
    report = tb.main(["--smoke", "--device", "cpu", "--out", str(out)])
    return report, json.loads(out.read_text())


def test_json_has_every_measurement(smoke):
    _, js = smoke
    for key in ("versions", "configs", "matmul", "kd", "ilkd", "summary", "seq_len", "precision"):
        assert key in js, key
    assert js["versions"]["torch"] == torch.__version__
    assert js["matmul"]["tflops"] > 0
    kd = js["kd"]
    assert kd["micro_batch"] == 2 and kd["batch_search"] == {"1": "ok", "2": "ok"}
    assert kd["mla_layers"] == [0, 2]  # conf/mix/paper.yaml with the tiny preset's paper_mla_layers
    for case in ("split", "stage_step", "packed"):
        res = kd[case]
        assert res["tokens_per_s"] > 0 and res["step_ms"] > 0 and 0 < res["mfu"], case
    phases = {"teacher_forward", "student_forward", "kd_loss", "student_backward", "optimizer"}
    assert set(kd["split"]["phase_ms"]) == phases | {"student_step"}
    assert set(kd["split"]["tflops"]) == phases - {"optimizer"} | {"student_step", "step"}
    ph = kd["split"]["phase_ms"]
    # two timed steps: medians are means, so the median of the sums is the sum of the medians
    assert ph["student_step"] == pytest.approx(ph["student_forward"] + ph["kd_loss"] + ph["student_backward"])
    il = js["ilkd"]
    assert il["micro_batch"] == 2
    assert set(il["separate"]) == {"mla", "mamba"}
    assert il["joint"]["students"] == ["mla", "mamba"]
    assert il["joint_speedup_over_separate"] == pytest.approx(
        (il["separate"]["mla"]["step_ms"] + il["separate"]["mamba"]["step_ms"]) / il["joint"]["step_ms"])
    s = js["summary"]
    assert s["kd"]["micro_batch"] == 2 and "acceptance_mfu_ge_0.35" in s["kd"]
    assert "acceptance_speedup_ge_1.10" in s["ilkd"]


def test_benchmark_runs_the_stage_losses(smoke):
    _, js = smoke
    assert js["kd"]["loss_check"]["equal"], js["kd"]["loss_check"]  # split step == KDModule.kd_loss
    assert js["kd"]["weights_change_after_step"]
    lc = js["ilkd"]["loss_check"]  # both students from one teacher forward == each alone
    assert lc["joint"] == lc["separate"] and lc["max_abs_diff"] == 0.0


def test_flop_accounting(smoke):
    _, js = smoke
    shapes = models.build_shapes(smoke=True)
    T = js["seq_len"]
    fpt = F.kd_step_flops(shapes["kd_student"], shapes["kd_teacher"], T)
    assert js["kd"]["flops_per_token"] == pytest.approx(fpt)
    r = js["kd"]["split"]
    tokens = r["micro_batch"] * T
    assert r["tflops"]["step"] * 1e12 * r["step_ms"] / 1e3 == pytest.approx(fpt["total"] * tokens)
    assert r["tflops"]["teacher_forward"] * 1e12 * r["phase_ms"]["teacher_forward"] / 1e3 == \
        pytest.approx(fpt["teacher_forward"] * tokens)
    assert r["mfu"] == pytest.approx(fpt["total"] * tokens / (r["step_ms"] / 1e3) / js["matmul"]["flops_per_s"])
    # packed rows: the attention of their documents only
    p = js["kd"]["packed"]
    assert p["flops_per_token"]["total"] < fpt["total"]
    il = js["ilkd"]
    ild = F.ild_step_flops({"mla": shapes["ild_mla"], "mamba": shapes["ild_mamba"]}, shapes["ild_teacher"], T)
    assert il["flops_per_token"] == pytest.approx(ild)
    both = ild["student_train_mla"] + ild["student_train_mamba"]
    assert il["flop_bound_speedup"] == pytest.approx((2 * ild["teacher_forward"] + both) /
                                                     (ild["teacher_forward"] + both))


def test_real_shapes_without_building_them():
    shapes = models.build_shapes(smoke=False)
    s, t = shapes["kd_student"], shapes["kd_teacher"]
    assert s.hybrid_layer_types.count("mla") == 4 and s.mla_layers == [0, 5, 10, 14]
    assert (t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size) == (4096, 32, 14336, 128256)
    assert s.vocab_size == t.vocab_size == 128256 and s.hidden_size == 2048
    assert set(shapes["ild_mla"].hybrid_layer_types) == {"mla"}
    assert set(shapes["ild_mamba"].hybrid_layer_types) == {"mamba"}
    ild = F.ild_step_flops({"mla": shapes["ild_mla"], "mamba": shapes["ild_mamba"]}, shapes["ild_teacher"], 2048)
    both = ild["student_train_mla"] + ild["student_train_mamba"]
    assert (2 * ild["teacher_forward"] + both) / (ild["teacher_forward"] + both) == pytest.approx(1.14, abs=0.01)


def test_packed_batch():
    batch, lengths = models.make_batch(3, 32, 50, "cpu", docs=4, seed=1)
    assert all(sum(row) == 32 and len(row) == 4 for row in lengths)
    pos, mask = batch["position_ids"], batch["loss_mask"]
    for r, row in enumerate(lengths):
        ends = torch.tensor(row).cumsum(0) - 1
        assert not mask[r, ends].any() and int(mask[r].sum()) == 32 - 4
        assert int((pos[r] == 0).sum()) == 4
    assert F.doc_lengths_from_position_ids(pos) == [n for row in lengths for n in row]
    one, _ = models.make_batch(2, 16, 50, "cpu")
    assert torch.equal(one["position_ids"][0], torch.arange(16)) and int(one["loss_mask"].sum()) == 2 * 15


def test_batch_search_stops_at_oom():
    seen = []

    def step(b):
        seen.append(b)
        if b >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    best, tried = tb.search_batch(step, tb.batch_candidates(64), "cpu", lambda m: None)
    assert best == 4 and seen == [1, 2, 4, 8] and tried["8"].startswith("oom")
    with pytest.raises(ValueError):
        tb.search_batch(lambda b: (_ for _ in ()).throw(ValueError("boom")), [1], "cpu", lambda m: None)
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_split_step_updates_the_student_like_the_stage():
    """One split step and one KDModule.training_step step from the same start give the same weights."""
    from zebra.stages.kd import KDModule

    shapes = models.build_shapes(smoke=True)
    teacher = models.build_teacher(shapes["kd_teacher"], "cpu", dtype=torch.float32)
    batch, _ = models.make_batch(2, 32, shapes["kd_student"].vocab_size, "cpu", docs=2)
    results = []
    for mode in ("split", "stage"):
        student = models.build_student(shapes["kd_student"], "cpu", seed=5)
        module = KDModule(student, teacher, seq_len=32)
        opt = models.make_optimizer(module, 1e-3, "cpu")
        before = student.model.layers[1].mixer.out_proj.weight.detach().clone()
        if mode == "split":
            loss = tb.kd_split_step(module, opt, batch, "cpu", "fp32")
        else:
            loss = tb.stage_step(module, opt, batch, 0, "cpu", "fp32")
        after = student.model.layers[1].mixer.out_proj.weight.detach()
        assert not torch.equal(before, after)
        assert all(p.grad is None for p in student.parameters())  # zero_grad(set_to_none) ran
        results.append((loss, after.clone()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.gpu
def test_smoke_on_cuda(tmp_path):
    """The CUDA path at smoke shapes (events, bf16 autocast, mamba_ssm kernels when installed, memory and sync
    counts): run on the lent GPU with -m gpu."""
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    out = tmp_path / "tb.json"
    tb.main(["--smoke", "--device", "cuda", "--out", str(out)])
    js = json.loads(out.read_text())
    assert js["precision"] == "bf16-mixed" and js["matmul"]["dtype"] == "bfloat16"
    kd, il = js["kd"], js["ilkd"]
    assert kd["weights_change_after_step"]
    assert kd["loss_check"]["abs_diff"] <= 1e-3 * max(1.0, abs(kd["loss_check"]["kd_module_loss"]))
    assert il["loss_check"]["max_abs_diff"] <= 1e-3 * max(1.0, *il["loss_check"]["joint"].values())
    for res in (kd["split"], kd["stage_step"], kd["packed"], il["joint"], il["separate"]["mla"],
                il["separate"]["mamba"]):
        assert res["peak_mem_gib"] > 0 and res["tokens_per_s"] > 0
        assert isinstance(res["host_syncs_per_step"]["count"], int)
