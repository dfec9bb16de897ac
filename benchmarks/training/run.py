"""The training benchmark's run: the kd and ilkd measurements (what they are: the package docstring), each written
to the JSON as it finishes, and the command line."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
import traceback
import warnings

import torch

import benchmarks.training
from benchmarks.harness import GIB, Device, NoTimer, PhaseTimer, count_host_syncs, is_oom, matmul_rate, versions
from benchmarks.training.models import (build_shapes, build_student, build_teacher, config_summary, make_batch,
                                        make_optimizer)
from benchmarks.training.report import fmt, summary
from zebra.plan import flops as F
from zebra.utils.files import write_json_atomic


def autocast(device, precision: str):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")



def measure(step, device, warmup: int, iters: int, tokens: int, phase_flops: dict, peak_flops: float,
            combine: dict | None = None) -> dict:
    """Warm-up, then `iters` timed steps (`step(timer)` marks its phases). Medians per phase and of the whole
    step; TFLOP/s per phase from `phase_flops` (FLOPs per step of each phase; key "step" for the whole).
    `combine` names sums of phases ({"student_step": (phase, ...)}), timed per step like the phases."""
    for _ in range(warmup):
        step(NoTimer())
    Device(device).sync()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    runs = []
    for _ in range(iters):
        timer = PhaseTimer(device)
        step(timer)
        runs.append(timer.phases())
    totals = [sum(r.values()) for r in runs]
    for r in runs:
        for name, parts in (combine or {}).items():
            r[name] = sum(r[p] for p in parts)
    step_ms = statistics.median(totals)
    phases = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    res = {"iters": iters, "warmup": warmup, "step_ms": step_ms, "step_ms_min": min(totals), "phase_ms": phases,
           "tokens_per_step": tokens, "tokens_per_s": tokens / (step_ms / 1e3)}
    tflops = {}
    for name, fl in phase_flops.items():
        ms = step_ms if name == "step" else phases.get(name)
        if ms:
            tflops[name] = fl / (ms / 1e3) / 1e12
    res["tflops"] = tflops
    if "step" in phase_flops and peak_flops:
        res["mfu"] = phase_flops["step"] / (step_ms / 1e3) / peak_flops
    if cuda:
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    return res



# ------------------------------------------------------------------------------------------------ kd
KD_STUDENT_PHASES = ("student_forward", "kd_loss", "student_backward")


def kd_split_step(module, opt, batch, device, precision, timer=None):
    """One KD step with its phases marked: teacher_forward | student_forward (body + final norm) | kd_loss (the
    chunked loss: both models' logits, and the student's logit gradients pushed through its LM head) |
    student_backward | optimizer. "student_step" = the three student phases. Autocast covers what Lightning's
    bf16-mixed covers (the training step), not the backward."""
    from zebra.stages.teacher import teacher_forward

    timer = timer or NoTimer()
    teacher = module.frozen("teacher")
    timer.mark("start")
    with autocast(device, precision):
        t = teacher_forward(teacher, batch["input_ids"], batch["position_ids"], batch.get("attention_mask"))
    timer.mark("teacher_forward")
    with autocast(device, precision):
        loss, _ = module.kd_loss_from_teacher(batch, t, lambda: timer.mark("student_forward"))
    timer.mark("kd_loss")
    del t
    loss.backward()
    timer.mark("student_backward")
    opt.step()
    opt.zero_grad(set_to_none=True)
    timer.mark("optimizer")
    return loss.detach()


def stage_step(module, opt, batch, step_idx, device, precision, timer=None):
    """The stage's own `training_step` (KDModule or ILDModule: token counting, finite check, float(loss)),
    then backward and the optimizer, as Lightning's automatic optimisation runs them."""
    timer = timer or NoTimer()
    timer.mark("start")
    with warnings.catch_warnings():
        # self.log() without a Trainer warns and does nothing (only that warning: host-sync warnings must pass)
        warnings.filterwarnings("ignore", message=re.escape("You are trying to `self.log()`"))
        with autocast(device, precision):
            loss = module.training_step(batch, step_idx)
    loss.backward()
    timer.mark("fwd_bwd")
    opt.step()
    opt.zero_grad(set_to_none=True)
    timer.mark("optimizer")
    return loss.detach()


def search_batch(try_step, candidates, device, log, on_oom=None) -> tuple[int | None, dict]:
    """Largest candidate micro-batch whose step runs (stops at the first that runs out of memory; `on_oom`
    then drops what the failed step left, e.g. partial gradients)."""
    best, tried = None, {}
    for b in candidates:
        ok, err = True, None
        try:
            try_step(b)
            Device(device).sync()
        except Exception as e:  # noqa: BLE001 - only OOM ends the search quietly
            if not is_oom(e):
                raise
            ok, err = False, f"{type(e).__name__}"
        if not ok and on_oom is not None:
            on_oom()
        Device(device).free(collect=True)
        tried[str(b)] = "ok" if ok else f"oom ({err})"
        log(f"  micro-batch {b}: {tried[str(b)]}")
        if not ok:
            break
        best = b
    return best, tried


def batch_candidates(max_batch: int) -> list[int]:
    out, b = [], 1
    while b <= max_batch:
        out.append(b)
        b *= 2
    return out


def weights_changed(param: torch.Tensor, before: torch.Tensor) -> bool:
    return not torch.equal(param.detach(), before)


def run_kd(args, shapes, device, peak, report, save, log):
    from zebra.stages.kd import KDModule

    T = args.seq
    out = report.setdefault("kd", {})
    teacher = build_teacher(shapes["kd_teacher"], device)
    student = build_student(shapes["kd_student"], device)
    if args.precision == "bf16":
        student.to(torch.bfloat16)
    module = KDModule(student, teacher, chunk_size=args.kd_chunk_size, seq_len=T)
    opt = make_optimizer(module, 8e-5, device)
    vocab = shapes["kd_student"].vocab_size
    out["params"] = {"student": sum(p.numel() for p in student.parameters()),
                     "teacher": sum(p.numel() for p in teacher.parameters())}
    out["mla_layers"] = shapes["kd_student"].mla_layers
    out["flops_per_token"] = F.kd_step_flops(shapes["kd_student"], shapes["kd_teacher"], T)
    save()

    # the benchmark's split step computes the stage's loss (same batch, before any update)
    batch, _ = make_batch(1, T, vocab, device, seed=123)
    with torch.no_grad(), autocast(device, args.precision):
        ref = module.kd_loss(batch)[0].float().item()
        from zebra.stages.teacher import teacher_forward
        t = teacher_forward(teacher, batch["input_ids"], batch["position_ids"], batch["attention_mask"])
        ours = module.kd_loss_from_teacher(batch, t)[0].float().item()
    out["loss_check"] = {"kd_module_loss": ref, "benchmark_loss": ours, "equal": ref == ours,
                         "abs_diff": abs(ref - ours)}
    del t, batch

    probe = next(p for n, p in student.named_parameters() if n.endswith("layers.0.mixer.o_proj.weight")
                 or n.endswith("layers.0.mixer.out_proj.weight"))
    before = probe.detach().clone()

    def try_step(b):
        batch, _ = make_batch(b, T, vocab, device, seed=b)
        kd_split_step(module, opt, batch, device, args.precision)

    if args.batch:
        mb, tried = args.batch, {"fixed": args.batch}
        try_step(mb)
    else:
        log(f"kd: searching the micro-batch at seq {T}")
        mb, tried = search_batch(try_step, batch_candidates(args.max_batch), device, log,
                                 on_oom=lambda: opt.zero_grad(set_to_none=True))
    out["batch_search"] = tried
    out["weights_change_after_step"] = weights_changed(probe, before)
    del before
    if mb is None:
        out["error"] = "micro-batch 1 does not fit"
        save()
        log("kd: micro-batch 1 does not fit")
        return
    out["micro_batch"] = mb
    save()

    def flops_for(fpt, lengths, tokens):
        """FLOPs per step of each phase (all tokens counted; the loss skips each document's last token)."""
        sf = F.forward_flops(shapes["kd_student"], T, lengths)
        body, head = sf["total"] - sf["lm_head"], sf["lm_head"]
        return {"teacher_forward": fpt["teacher_forward"] * tokens, "student_forward": body * tokens,
                "kd_loss": (3 * head + fpt["teacher_lm_head"]) * tokens, "student_backward": 2 * body * tokens,
                "student_step": (fpt["student_train"] + fpt["teacher_lm_head"]) * tokens,
                "step": fpt["total"] * tokens}

    def split_case(name, docs):
        b = mb
        while b:
            try:
                batch, lengths = make_batch(b, T, vocab, device, docs=docs, seed=7)
                fpt = F.kd_step_flops(shapes["kd_student"], shapes["kd_teacher"], T, lengths)
                res = measure(lambda tm: kd_split_step(module, opt, batch, device, args.precision, tm), device,
                              args.warmup, args.iters, b * T, flops_for(fpt, lengths, b * T), peak,
                              combine={"student_step": KD_STUDENT_PHASES})
                res.update(micro_batch=b, docs_per_row=docs, flops_per_token=fpt)
                res["student_tflops_excluding_teacher_logits"] = \
                    fpt["student_train"] * b * T / (res["phase_ms"]["student_step"] / 1e3) / 1e12
                if args.sync_debug:
                    res["host_syncs_per_step"] = count_host_syncs(
                        lambda: kd_split_step(module, opt, batch, device, args.precision), device)
                out[name] = res
                log(f"kd {name} b={b} docs/row={docs}: {fmt(res)}")
                break
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                opt.zero_grad(set_to_none=True)
                Device(device).free(collect=True)
                log(f"kd {name} b={b}: out of memory, halving")
                b //= 2
        if not b:
            out[name] = {"error": "out of memory at micro-batch 1"}
        Device(device).free(collect=True)
        save()

    split_case("split", 1)
    if args.stage_step:
        try:
            batch, _ = make_batch(mb, T, vocab, device, seed=8)
            fpt = out["flops_per_token"]
            res = measure(lambda tm: stage_step(module, opt, batch, 0, device, args.precision, tm), device,
                          max(1, args.warmup - 1), args.short_iters, mb * T, {"step": fpt["total"] * mb * T},
                          peak)
            if args.sync_debug:
                res["host_syncs_per_step"] = count_host_syncs(
                    lambda: stage_step(module, opt, batch, 0, device, args.precision), device)
            res["micro_batch"] = mb
            out["stage_step"] = res
            log(f"kd stage training_step b={mb}: {fmt(res)}")
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            out["stage_step"] = {"error": "out of memory"}
        opt.zero_grad(set_to_none=True)
        Device(device).free(collect=True)
        save()
    if args.packed:
        split_case("packed", args.docs)
    module = opt = student = teacher = probe = None  # noqa: F841 - freed before the next benchmark
    Device(device).free(collect=True)


# ------------------------------------------------------------------------------------------------ ilkd
def run_ilkd(args, shapes, device, peak, report, save, log):
    from zebra.stages.teacher import teacher_forward
    from zebra.stages.ilkd import ILDModule

    T = args.seq
    out = report.setdefault("ilkd", {})
    vocab = shapes["ild_teacher"].vocab_size
    teacher = build_teacher(shapes["ild_teacher"], device)
    students = {"mla": build_student(shapes["ild_mla"], device, seed=2),
                "mamba": build_student(shapes["ild_mamba"], device, seed=3)}
    if args.precision == "bf16":
        for s in students.values():
            s.to(torch.bfloat16)
    out["params"] = {k: sum(p.numel() for p in s.parameters()) for k, s in students.items()}
    out["params"]["teacher"] = sum(p.numel() for p in teacher.parameters())
    fpt = F.ild_step_flops({k: shapes[f"ild_{k}"] for k in students}, shapes["ild_teacher"], T)
    out["flops_per_token"] = fpt

    def module_for(kinds):
        return ILDModule({k: students[k] for k in kinds}, teacher, mixer_loss=True, last_layer_target="normed",
                         seq_len=T)

    # one teacher forward for both students gives each the loss it gets alone (same batch, before updates)
    batch, _ = make_batch(1, T, vocab, device, seed=321)
    with torch.no_grad(), autocast(device, args.precision):
        joint = {k: v.float().item() for k, v in module_for(("mla", "mamba")).ild_losses(batch).items()}
        alone = {k: module_for((k,)).ild_losses(batch)[k].float().item() for k in students}
    out["loss_check"] = {"joint": joint, "separate": alone,
                         "max_abs_diff": max(abs(joint[k] - alone[k]) for k in students)}
    del batch
    save()

    def step_flops(kinds, tokens):
        total = fpt["teacher_forward"] + sum(fpt[f"student_train_{k}"] for k in kinds)
        return {"step": total * tokens}

    def run(kinds, b, search=False):
        module = module_for(kinds)
        module.train()
        opt = make_optimizer(module, 2e-4, device)
        cuda = torch.device(device).type == "cuda"
        try:
            if search:
                def try_step(bb):
                    bt, _ = make_batch(bb, T, vocab, device, seed=bb)
                    stage_step(module, opt, bt, 0, device, args.precision)
                    opt.zero_grad(set_to_none=True)

                b, tried = search_batch(try_step, batch_candidates(args.max_batch), device, log,
                                        on_oom=lambda: opt.zero_grad(set_to_none=True))
                out["batch_search"] = tried
                if b is None:
                    return None, None
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            bt, _ = make_batch(b, T, vocab, device, seed=9)
            res = measure(lambda tm: stage_step(module, opt, bt, 0, device, args.precision, tm), device,
                          args.warmup, args.iters, b * T, step_flops(kinds, b * T), peak)
            if cuda:  # the whole run, first step (optimizer state allocation) included
                res["peak_mem_gib_run"] = torch.cuda.max_memory_allocated(device) / GIB
            if args.sync_debug:
                res["host_syncs_per_step"] = count_host_syncs(
                    lambda: stage_step(module, opt, bt, 0, device, args.precision), device)
            res.update(micro_batch=b, students=list(kinds))
            return b, res
        finally:
            opt.zero_grad(set_to_none=True)
            opt = module = None  # noqa: F841 - the optimizer states go before the next run
            Device(device).free(collect=True)

    if args.batch:
        mb, joint_res = run(("mla", "mamba"), args.batch)
    else:
        log(f"ilkd: searching the joint micro-batch at seq {T}")
        mb, joint_res = run(("mla", "mamba"), None, search=True)
    if mb is None:
        out["error"] = "micro-batch 1 does not fit the joint run"
        save()
        return
    out["micro_batch"] = mb
    out["joint"] = joint_res
    log(f"ilkd joint (mla+mamba, one teacher forward) b={mb}: {fmt(joint_res)}")
    save()

    # the teacher forward alone (hidden states + attention outputs, as ILD asks for it)
    bt, _ = make_batch(mb, T, vocab, device, seed=9)

    def teacher_only(tm):
        tm.mark("start")
        with autocast(device, args.precision):
            teacher_forward(teacher, bt["input_ids"], bt["position_ids"], bt["attention_mask"],
                                   hidden_states=True, mixer_outputs=True)
        tm.mark("teacher_forward")

    tres = measure(teacher_only, device, 1, args.short_iters, mb * T,
                   {"teacher_forward": fpt["teacher_forward"] * mb * T}, peak)
    out["teacher_forward"] = tres
    log(f"ilkd teacher forward alone b={mb}: {fmt(tres)}")
    bt = None
    save()

    out["separate"] = {}
    for kind in ("mla", "mamba"):
        other = "mamba" if kind == "mla" else "mla"
        students[other].to("cpu")  # off the card: each separate run holds one student, as a run of one would
        students[kind].to(device)
        Device(device).free(collect=True)
        try:
            _, res = run((kind,), mb)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            res = {"error": "out of memory at the joint micro-batch"}
            Device(device).free(collect=True)
        out["separate"][kind] = res
        if "step_ms" in res:
            log(f"ilkd separate ({kind}) b={mb}: {fmt(res)}")
        save()
    sep = out["separate"]
    if all("step_ms" in sep[k] for k in ("mla", "mamba")):
        t_sep = sep["mla"]["step_ms"] + sep["mamba"]["step_ms"]
        out["joint_speedup_over_separate"] = t_sep / joint_res["step_ms"]
        # FLOP bound: two teacher forwards + both students, over one teacher forward + both students
        both = fpt["student_train_mla"] + fpt["student_train_mamba"]
        out["flop_bound_speedup"] = (2 * fpt["teacher_forward"] + both) / (fpt["teacher_forward"] + both)
        log(f"ilkd joint / separate throughput: {out['joint_speedup_over_separate']:.3f}x "
            f"(FLOP bound {out['flop_bound_speedup']:.3f}x)")
    for s in students.values():
        s.to(device)
    save()
    students = teacher = None  # noqa: F841
    Device(device).free(collect=True)


# ------------------------------------------------------------------------------------------------ main
def run_versions(device) -> dict:
    from zebra.model import ZebraConfig
    from zebra.model.ops.dispatch import causal_conv1d_kernels, mamba_backend

    info = versions("transformers", "lightning", "mamba_ssm", "causal_conv1d", "triton")
    info.update(mamba_backend=mamba_backend(ZebraConfig(), device, torch.bfloat16),
                causal_conv1d_kernels=causal_conv1d_kernels() is not None,
                env={k: os.environ.get(k) for k in ("ZEBRA_MAMBA_KERNELS", "PYTORCH_CUDA_ALLOC_CONF")})
    if torch.device(device).type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / GIB
    else:
        info["device"] = f"cpu ({torch.get_num_threads()} threads)"
    return info


def parse_args(argv=None):
    doc = benchmarks.training.__doc__
    ap = argparse.ArgumentParser(prog="python -m benchmarks.training", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    ap.add_argument("--out", default="experiments/training_throughput/training_bench.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, seq 64 (checks the code path; times nothing)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; smoke 64)")
    ap.add_argument("--batch", type=int, default=None, help="fixed micro-batch (default: the largest that fits)")
    ap.add_argument("--max-batch", type=int, default=None, help="largest micro-batch tried (default 64; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per measurement (default 3; smoke 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per measurement (default 8; smoke 2)")
    ap.add_argument("--only", choices=["kd", "ilkd"], default=None)
    ap.add_argument("--precision", choices=["bf16-mixed", "fp32", "bf16"], default=None,
                    help="bf16-mixed: fp32 master weights + bf16 autocast (the stages on GPU; default on CUDA); "
                         "fp32 (default on CPU); bf16: student weights in bf16, no autocast")
    ap.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                    help="kd: also measure a packed batch (--docs documents per row) after the one-document-per-row "
                         "batches that the micro-batch search and the main measurement use")
    ap.add_argument("--docs", type=int, default=4, help="documents per row in packed batches")
    ap.add_argument("--kd-chunk-size", type=int, default=None, help="KD loss tokens per chunk (default: auto)")
    ap.add_argument("--kernels", choices=["auto", "torch", "mamba_ssm"], default=None,
                    help="sets ZEBRA_MAMBA_KERNELS for this run (default: leave the environment as it is)")
    ap.add_argument("--no-stage-step", dest="stage_step", action="store_false",
                    help="skip the measurement through KDModule.training_step")
    ap.add_argument("--no-sync-debug", dest="sync_debug", action="store_false",
                    help="skip counting host syncs per step (torch.cuda.set_sync_debug_mode)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    smoke = args.smoke
    args.seq = args.seq or (64 if smoke else 2048)
    args.max_batch = args.max_batch or (2 if smoke else 64)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 3)
    args.iters = args.iters or (2 if smoke else 8)
    args.short_iters = args.iters if smoke else max(3, args.iters // 2)  # stage-step and teacher-only cases
    args.precision = args.precision or ("bf16-mixed" if dev.type == "cuda" else "fp32")
    if smoke:
        args.docs = min(args.docs, 4)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.kernels:
        os.environ["ZEBRA_MAMBA_KERNELS"] = args.kernels
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current device (CUDA_VISIBLE_DEVICES picks the card)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    shapes = build_shapes(args.smoke)
    report = {"benchmark": "training", "smoke": args.smoke, "args": vars(args), "versions": run_versions(device),
              "seq_len": args.seq, "precision": args.precision,
              "configs": {k: config_summary(v) for k, v in shapes.items()},
              "flops_convention": F.__doc__.split("\n\n")[1]}

    def save():
        report["summary"] = summary(report)
        report["elapsed_s"] = time.perf_counter() - t0
        write_json_atomic(args.out, report)

    log(f"device {report['versions']['device']}, torch {torch.__version__}, mamba backend "
        f"{report['versions']['mamba_backend']} (mamba_ssm {report['versions']['mamba_ssm']}), "
        f"precision {args.precision}, seq {args.seq}")
    report["matmul"] = matmul_rate(device, args.smoke)
    peak = report["matmul"]["flops_per_s"]
    log(f"matmul rate ({report['matmul']['dtype']}): {report['matmul']['tflops']:.1f} TFLOP/s "
        f"{report['matmul']['per_size_tflops']}")
    save()
    for name, fn in (("kd", run_kd), ("ilkd", run_ilkd)):
        if args.only not in (None, name):
            continue
        try:
            fn(args, shapes, device, peak, report, save, log)
        except Exception as e:  # noqa: BLE001 - record it and go on to the next benchmark
            traceback.print_exc()
            report.setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
            log(f"{name}: ERROR {type(e).__name__}: {e}")
            if args.smoke:
                save()
                raise
        Device(device).free(collect=True)
        save()
    log(f"wrote {args.out}")
    print(f"summary: {report['summary']}", flush=True)
    return report


