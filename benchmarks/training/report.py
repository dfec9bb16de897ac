"""The training benchmark's summary (the headline numbers and their acceptance marks, rewritten into the JSON
after every measurement) and the one-line form of a measurement that the run prints."""

from __future__ import annotations


def fmt(res: dict) -> str:
    ph = " / ".join(f"{k} {v:.1f}" for k, v in res["phase_ms"].items())
    tf = ", ".join(f"{k} {v:.0f}" for k, v in res["tflops"].items())
    s = f"{res['tokens_per_s']:.0f} tok/s, step {res['step_ms']:.1f} ms ({ph} ms), TFLOP/s: {tf}"
    if "mfu" in res:
        s += f", MFU {100 * res['mfu']:.1f}%"
    if "peak_mem_gib" in res:
        s += f", peak {res['peak_mem_gib']:.1f} GiB"
    return s



def summary(report: dict) -> dict:
    s = {"matmul_tflops": report.get("matmul", {}).get("tflops")}
    kd = report.get("kd", {})
    if "tflops" in kd.get("split", {}):
        r = kd["split"]
        s["kd"] = {"micro_batch": r["micro_batch"], "tokens_per_s": r["tokens_per_s"], "mfu": r.get("mfu"),
                   "teacher_forward_tflops": r["tflops"].get("teacher_forward"),
                   "student_step_tflops": r["tflops"].get("student_step"),
                   "student_step_tflops_excluding_teacher_logits": r.get("student_tflops_excluding_teacher_logits"),
                   "phase_ms": r["phase_ms"],
                   "peak_mem_gib": r.get("peak_mem_gib"),
                   "acceptance_mfu_ge_0.35": (r.get("mfu") or 0) >= 0.35,
                   "acceptance_student_ge_150_tflops": (r["tflops"].get("student_step") or 0) >= 150}
        if "tflops" in kd.get("stage_step", {}):
            s["kd"]["stage_training_step_tokens_per_s"] = kd["stage_step"]["tokens_per_s"]
            s["kd"]["stage_training_step_mfu"] = kd["stage_step"].get("mfu")
        if "tflops" in kd.get("packed", {}):
            s["kd"]["packed_tokens_per_s"] = kd["packed"]["tokens_per_s"]
            s["kd"]["packed_mfu"] = kd["packed"].get("mfu")
    il = report.get("ilkd", {})
    if "joint" in il and il["joint"]:
        s["ilkd"] = {"micro_batch": il.get("micro_batch"), "joint_tokens_per_s": il["joint"]["tokens_per_s"],
                     "joint_mfu": il["joint"].get("mfu"), "joint_peak_mem_gib": il["joint"].get("peak_mem_gib_run"),
                     "separate_peak_mem_gib": {k: v.get("peak_mem_gib_run") for k, v in il.get("separate", {}).items()},
                     "joint_speedup_over_separate": il.get("joint_speedup_over_separate"),
                     "flop_bound_speedup": il.get("flop_bound_speedup")}
        if il.get("joint_speedup_over_separate") is not None:
            s["ilkd"]["acceptance_speedup_ge_1.10"] = il["joint_speedup_over_separate"] >= 1.10
    return s
