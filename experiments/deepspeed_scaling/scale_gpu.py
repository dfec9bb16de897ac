"""DeepSpeed ZeRO on two to eight GPUs, through `train.py` as a user runs it.

    python experiments/deepspeed_scaling/scale_gpu.py --out $OUT/scale_gpu.json            # a two-GPU machine
    python experiments/deepspeed_scaling/scale_gpu.py --smoke --out /tmp/scale_smoke.json  # CPU: checks the driver

Part `equivalence`, for deepspeed_zero2 and deepspeed_zero3: `ilkd` then `kd` (a SmolLM2-135M-shaped random base
as teacher; 6 MLA layers placed uniformly) once with one GPU and once with two, on the same global batch. Records
the loss of the first 10 steps of each stage (two GPUs vs one), the fraction of each trained tensor's elements that
moved from its starting value (every tensor must move: the ZeRO-3 trap leaves some untouched), the export check
(the export gathered from the shards, loaded with from_pretrained, logits vs the in-memory model) and tokens/s per
GPU.

Parts `twonode` and `paper8b` (four or eight GPUs): two "nodes" of two GPUs against one node of four
(`kd`, ZeRO-3, zebra_1b student shape, 8B-shaped teacher), and zebra_8b `kd` at the paper's per-device batch.

Part `zebra8b`: one `kd` run of a few steps with the zebra_8b student shape (random init, created sharded) and an
8B-shaped random teacher (bf16, replicated) on two GPUs: deepspeed_zero3 where a GPU has >= 120 GB, else
deepspeed_zero3_offload with activation checkpointing. No checkpoint and no export. Records peak memory per GPU
and tokens/s, beside `stage=describe`'s estimate for the same strategy and devices.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from zebra.utils.files import write_json_atomic  # noqa: E402
from zebra.launch.proctree import kill_tree  # noqa: E402
from zebra.launch.trainer import read_step_trace  # noqa: E402


LOGS = Path("/tmp")
LAUNCH_TIMEOUT = 900.0


STARTED: list[subprocess.Popen] = []


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A launch in its own process group, so that a timeout ends torchrun's workers too."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    STARTED.append(proc)
    return proc


def on_terminate(signum, frame):
    """`timeout` (SIGTERM) reaches only this driver: end the launches' process groups too (they run in their own
    sessions and would go on holding the GPUs), then unwind so that main() saves what is known."""
    for proc in STARTED:
        if proc.poll() is None:
            kill_tree(proc)
    raise SystemExit(f"terminated by signal {signum}")


def wait(proc: subprocess.Popen, timeout: float):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return "timeout"


def finish(proc: subprocess.Popen, t0: float, log: Path, timeout: float | None = None) -> dict:
    rc = wait(proc, timeout or LAUNCH_TIMEOUT)
    out = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log": str(log)}
    if rc != 0:
        out["tail"] = log.read_text()[-3000:]
        print(f"FAILED ({rc}): {' '.join(proc.args[:6])} ... see {log}\n{out['tail'][-1500:]}", flush=True)
    return out


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> dict:
    t0 = time.perf_counter()
    return finish(start(cmd, log, env), t0, log, timeout)


def train_cmd(args: list[str], nproc: int) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "train.py", *args]
    return [sys.executable, "train.py", *args]


def env_for(devices: str | None) -> dict:
    # TRITON_CACHE_AUTOTUNING: later launches on the same machine reuse the mamba_ssm kernels' autotuning (the
    # first step of a launch otherwise spends ~1.5 min re-benchmarking their configurations)
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               TRITON_CACHE_AUTOTUNING="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def throughput(steps: list[dict], world: int, skip: int = 2) -> dict:
    """tokens/s per GPU over the steps after the first `skip` (warm-up, kernel autotuning)."""
    timed = steps[skip:] if len(steps) > skip else steps
    tokens = sum(s["tokens"] for s in timed)
    seconds = sum(s["seconds"] for s in timed)
    out = {"steps_timed": len(timed), "tokens_per_s": tokens / seconds if seconds else None}
    out["tokens_per_s_per_gpu"] = out["tokens_per_s"] / world if out["tokens_per_s"] else None
    peaks = [s["peak_mem_gb"] for s in steps if "peak_mem_gb" in s]
    if peaks:
        out["peak_mem_gb_max_over_ranks"] = max(peaks)
    return out


EQ_MODEL = {True: ("tiny", 32, 4, 4, 2), False: ("smollm2_135m", 512, 10, 8, 6)}  # smoke?: model, seq, steps,
#                                                                                       global batch, MLA layers


def equivalence_cmd(args, work: Path, data: Path, tokenizer: str, strategy: str, world: int) -> list[str]:
    model, seq, steps, global_batch, mix_n = EQ_MODEL[args.smoke]
    root = work / f"{strategy}-ws{world}"
    per = global_batch // world
    cmd = [
        "stage=pipeline", "stage.order=[ilkd,kd]", f"model={model}", "model.teacher=random:0",
        "model.kd_teacher=random:0", f"model.tokenizer={tokenizer}", "mix=uniform", f"mix.n_mla={mix_n}",
        "logger=none", f"strategy={strategy}", "export_check=true", "check_weights_moved=true",
        "trainer.enable_progress_bar=false",
        f"data.sft.sources=[{{path: '{data}'}}]", "data.sft.heldout_fraction=0.05",
        # the stages' own learning rates (METHOD: 2e-4 ILD, 8e-5 KD): at 3e-4 the bf16 ZeRO-3 KD curves of one
        # and two GPUs parted by up to 3.2% around step 3 (this folder's README), an Adam regime where rounding
        # differences in the gradients become different updates
        f"ilkd.seq_len={seq}", f"ilkd.max_steps={steps}", "ilkd.checkpoint_every_n_steps=0",
        f"kd.seq_len={seq}", f"kd.max_steps={steps}", "kd.checkpoint_every_n_steps=0",
        "kd.heldout_batches=1", f"paths.root={root}", f"ilkd.batch_size={per}", f"kd.batch_size={per}",
        f"trainer.devices={world}", "+callbacks.trace._target_=zebra.launch.trainer.StepTrace",
        f"+callbacks.trace.path={root / 'trace.jsonl'}",
    ]
    cmd.append("trainer=ddp_cpu" if args.smoke and world == 2 else "trainer=cpu" if args.smoke else "trainer=gpu")
    if args.precision:
        cmd.append(f"trainer.precision={args.precision}")
    return train_cmd(cmd, world)


def equivalence(args, work: Path, data: Path, tokenizer: str, strategies: list[str], save=lambda r: None) -> dict:
    """The one-GPU runs of every strategy side by side, each on its own GPU with its own tokenised-data cache and
    its share of the cores (side by side on one datasets cache they race, and each process taking every core
    slows the students' SVD init), then each strategy's two-GPU run."""
    import torch

    model, seq, steps, global_batch, mix_n = EQ_MODEL[args.smoke]
    results = {s: {"strategy": s, "model": model, "seq_len": seq, "steps": steps, "global_batch": global_batch,
                   "precision": args.precision or ("32-true" if args.smoke else "bf16-mixed")} for s in strategies}
    gpus = torch.cuda.device_count()
    side_by_side = not args.smoke and gpus >= len(strategies)
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // len(strategies)) if side_by_side else cores
    launches = {}
    # the i-th of this process's visible GPUs (CUDA_VISIBLE_DEVICES names physical cards: a driver confined to
    # cards 2,3 must hand its one-GPU runs 2 and 3, not 0 and 1)
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d] or [str(i) for i in range(gpus)]
    for i, strategy in enumerate(strategies):
        env = env_for(None if args.smoke else visible[i if side_by_side else 0])
        env["ZEBRA_CACHE"] = str(work / f"cache-{strategy}")
        cmd = equivalence_cmd(args, work, data, tokenizer, strategy, 1) + [f"num_threads={threads}"]
        t0 = time.perf_counter()
        launches[strategy] = (start(cmd, LOGS / f"{strategy}-ws1.log", env), t0)
        if not side_by_side:
            proc, t0 = launches[strategy]
            results[strategy]["ws1_run"] = finish(proc, t0, LOGS / f"{strategy}-ws1.log")
    if side_by_side:
        for strategy, (proc, t0) in launches.items():
            results[strategy]["ws1_run"] = finish(proc, t0, LOGS / f"{strategy}-ws1.log")
    for strategy in strategies:
        out = results[strategy]
        save(results)  # what is known so far survives a timeout of the whole call
        out["ws2_run"] = run(equivalence_cmd(args, work, data, tokenizer, strategy, 2), LOGS / f"{strategy}-ws2.log",
                             env_for(None))
        traces = {w: read_step_trace(work / f"{strategy}-ws{w}" / "trace.jsonl") for w in (1, 2)}
        if len(traces[1]) != 2 or len(traces[2]) != 2:
            out["error"] = "a run did not complete both stages"
            continue
        try:
            for i, stage in enumerate(("ilkd", "kd")):
                a = [r for r in traces[1][i] if r["event"] == "step"]
                b = [r for r in traces[2][i] if r["event"] == "step"]
                rel = [abs(y["loss"] - x["loss"]) / abs(x["loss"]) for x, y in zip(a, b)]
                out[stage] = {"loss_ws1": [x["loss"] for x in a], "loss_ws2": [y["loss"] for y in b],
                              "max_rel_diff": max(rel), "within_2pct": max(rel) <= 0.02,
                              "throughput_ws1": throughput(a, 1), "throughput_ws2": throughput(b, 2)}
            root2 = work / f"{strategy}-ws2"
            # the stages' own checks (check_weights_moved, export_check), from the two-GPU run's reports
            stage_reports = {"ilkd": root2 / model / "ilkd" / "report.json",
                             "kd": root2 / model / f"{mix_n}mla-uniform" / "kd" / "report.json"}
            out["weights_moved"] = {k: json.loads(p.read_text()).get("weights_moved") for k, p in stage_reports.items()}
            exports = {"kd": stage_reports["kd"], "ilkd_mla": root2 / model / "ilkd" / "mla" / "report.json",
                       "ilkd_mamba": root2 / model / "ilkd" / "mamba" / "report.json"}
            out["export_check"] = {k: json.loads(p.read_text()).get("export_check") for k, p in exports.items()}
        except Exception as err:  # keep what was measured
            out["error"] = repr(err)
    return results


def zebra8b(args, work: Path, data: Path, tokenizer: str) -> dict:
    import torch

    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 0.0
    if args.smoke:
        model, strategy, extra = "tiny", "deepspeed_zero3", ["trainer=ddp_cpu"]
    elif gpu_gb >= 120:
        model, strategy, extra = "zebra_8b", "deepspeed_zero3", ["trainer=gpu"]
    else:
        model, strategy = "zebra_8b", "deepspeed_zero3_offload"
        extra = ["trainer=gpu", "kd.gradient_checkpointing=true"]
    seq = 64 if args.smoke else 2048
    steps = 3 if args.smoke else 4
    root = work / "zebra8b"
    cmd = ["stage=kd", f"model={model}", "mix=paper", "model.teacher=random:0", "model.kd_teacher=random:1",
           f"model.tokenizer={tokenizer}", "kd.student_init=random", f"strategy={strategy}", "trainer.devices=2",
           "logger=none", "export=false", "check_weights_moved=true", "trainer.enable_progress_bar=false",
           f"data.sft.sources=[{{path: '{data}'}}]", "data.sft.heldout_fraction=0.05",
           f"kd.seq_len={seq}", "kd.batch_size=1", f"kd.max_steps={steps}", "kd.checkpoint_every_n_steps=0",
           "kd.heldout_batches=0", f"paths.root={root}", "num_threads=8",
           "+callbacks.trace._target_=zebra.launch.trainer.StepTrace",
           f"+callbacks.trace.path={root / 'trace.jsonl'}", *extra]
    out = {"model": model, "strategy": strategy, "gpu_memory_gb": round(gpu_gb, 1), "seq_len": seq,
           "micro_batch": 1, "devices": 2, "gradient_checkpointing": "kd.gradient_checkpointing=true" in extra}
    out["run"] = run(train_cmd(cmd, 2), LOGS / "zebra8b.log", env_for(None), timeout=args.zebra8b_timeout)
    runs = read_step_trace(root / "trace.jsonl")
    if runs:
        steps_done = [r for r in runs[0] if r["event"] == "step"]
        out["losses"] = [r["loss"] for r in steps_done]
        out["throughput"] = throughput(steps_done, 2, skip=1)
    report = root / model / "paper" / "kd" / "report.json"
    if report.is_file():
        out["weights_moved"] = json.loads(report.read_text()).get("weights_moved")
    describe = ["stage=describe", f"model={model}", "mix=paper", f"strategy={strategy}", "trainer=gpu",
                "trainer.devices=2", f"kd.seq_len={seq}", "kd.batch_size=1", "describe.train_stage=kd",
                f"describe.gpu_memory_gb={round(gpu_gb) or 80}"]
    if out["gradient_checkpointing"]:
        describe.append("kd.gradient_checkpointing=true")
    proc = subprocess.run([sys.executable, "train.py", *describe], cwd=REPO, env=env_for(""), capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out["describe"] = json.loads(lines[-1]).get("memory") if lines else {"error": proc.stderr[-2000:]}
    return out


def kd_overrides(model: str, tokenizer: str, data: Path, root: Path, extra: list[str]) -> list[str]:
    """`kd` at real shapes with random weights: student created sharded, teacher random (8B-shaped for every
    preset: `model.kd_teacher_base=zebra_8b`), no checkpoints, the stage's own weights-moved check."""
    return ["stage=kd", f"model={model}", "mix=paper", "model.teacher=random:0", "model.kd_teacher=random:1",
            "model.kd_teacher_base=zebra_8b", f"model.tokenizer={tokenizer}", "kd.student_init=random",
            "strategy=deepspeed_zero3", "trainer=gpu", "logger=none", "check_weights_moved=true",
            "trainer.enable_progress_bar=false", f"data.sft.sources=[{{path: '{data}'}}]",
            "data.sft.heldout_fraction=0.05", "kd.checkpoint_every_n_steps=0", "kd.heldout_batches=0",
            f"paths.root={root}", "num_threads=8", "+callbacks.trace._target_=zebra.launch.trainer.StepTrace",
            f"+callbacks.trace.path={root / 'trace.jsonl'}", *extra]


def kd_result(root: Path, model: str, world: int) -> dict:
    runs = read_step_trace(root / "trace.jsonl")
    out: dict = {}
    if runs:
        steps = [r for r in runs[0] if r["event"] == "step"]
        out["losses"] = [r["loss"] for r in steps]
        out["throughput"] = throughput(steps, world, skip=2)
    report = root / model / "paper" / "kd" / "report.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        out.update({k: rep.get(k) for k in ("weights_moved", "export_check", "params")})
    return out


def twonode(args, work: Path, data: Path, tokenizer: str) -> dict:
    """Two "nodes" of two GPUs (two torchrun groups, node ranks 0 and 1, one rendezvous on
    loopback) against one node of four, `kd` under ZeRO-3 at the zebra_1b student shape with an 8B-shaped teacher,
    same global batch; the export is gathered from the shards and checked."""
    import socket

    steps, seq, per_gpu = 10, 2048, 2
    extra = [f"kd.seq_len={seq}", f"kd.batch_size={per_gpu}", f"kd.max_steps={steps}"]
    out: dict = {"model": "zebra_1b", "teacher": "8B-shaped random", "seq_len": seq, "micro_batch": per_gpu,
                 "global_batch": 4 * per_gpu, "steps": steps}
    one = work / "twonode-one"
    # the reference run exports nothing: the two-node run's export is the one gathered and checked
    one_cmd = kd_overrides("zebra_1b", tokenizer, data, one, extra + ["trainer.devices=4", "export=false"])
    out["one_node_run"] = run(train_cmd(one_cmd, 4), LOGS / "twonode-one.log", env_for(None))
    out["one_node"] = kd_result(one, "zebra_1b", 4)
    two = work / "twonode-two"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for node_rank, gpus in ((0, "0,1"), (1, "2,3")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node_rank}",
               "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}", "train.py",
               *kd_overrides("zebra_1b", tokenizer, data, two, extra + ["trainer.devices=2", "trainer.num_nodes=2",
                                                                     "export_check=true"])]
        procs.append(start(cmd, LOGS / f"twonode-node{node_rank}.log", env_for(gpus)))
    t0 = time.perf_counter()
    out["two_node_rc"] = [wait(p, LAUNCH_TIMEOUT) for p in procs]
    out["two_node_seconds"] = round(time.perf_counter() - t0, 1)
    out["two_nodes"] = kd_result(two, "zebra_1b", 4)
    a, b = out["one_node"].get("losses"), out["two_nodes"].get("losses")
    if a and b:
        rel = [abs(y - x) / abs(x) for x, y in zip(a, b)]
        out["max_rel_diff"] = max(rel)
    return out


def paper8b(args, work: Path, data: Path, tokenizer: str) -> dict:
    """zebra_8b `kd` at the paper's per-device batch (4 x 2048 tokens, gradient accumulation 2)
    under ZeRO-3 with activation checkpointing on every GPU of the machine; MFU over the measured 790 TFLOP/s."""
    import torch

    from omegaconf import OmegaConf

    from zebra.plan.describe import zebra_config_from_preset
    from zebra.plan.flops import kd_step_flops
    from zebra.plan.mixes import layer_types_for
    from zebra.plan.presets import preset

    gpus = torch.cuda.device_count()
    root = work / "paper8b"
    extra = ["kd.seq_len=2048", "kd.batch_size=4", "kd.accumulate_grad_batches=2", "kd.max_steps=5",
             "kd.gradient_checkpointing=true", "export=false", f"trainer.devices={gpus}"]
    out: dict = {"model": "zebra_8b", "gpus": gpus, "micro_batch": 4, "accumulate": 2, "seq_len": 2048}
    out["run"] = run(train_cmd(kd_overrides("zebra_8b", tokenizer, data, root, extra), gpus), LOGS / "paper8b.log",
                     env_for(None))
    out.update(kd_result(root, "zebra_8b", gpus))
    node = preset("zebra_8b")
    student = zebra_config_from_preset(node, layer_types_for(32, list(OmegaConf.to_container(node.paper_mla_layers))))
    from transformers import LlamaConfig

    teacher = LlamaConfig(**OmegaConf.to_container(node.base, resolve=True))
    fpt = kd_step_flops(student, teacher, 2048)["total"]
    tps = (out.get("throughput") or {}).get("tokens_per_s")
    if tps:
        out["flops_per_token"] = fpt
        out["mfu"] = tps * fpt / (790e12 * gpus)
        out["hours_for_11B_tokens"] = 11e9 / tps / 3600
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/zebra-scale")
    ap.add_argument("--parts", default="zebra8b,equivalence")
    ap.add_argument("--strategies", default="deepspeed_zero2,deepspeed_zero3")
    ap.add_argument("--tokenizer", default=str(REPO / ".gpu" / "tokenizer"))
    ap.add_argument("--zebra8b-timeout", type=float, default=420)
    ap.add_argument("--logs", default=None, help="where each launch's log goes (default: --work)")
    ap.add_argument("--launch-timeout", type=float, default=900)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--precision", default=None,
                    help="equivalence runs' trainer.precision (default: the trainer's, bf16-mixed on GPUs); 32-true "
                         "separates sharding errors from bf16 rounding")
    args = ap.parse_args()
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown} (of {', '.join(PARTS)})")
    global LOGS, LAUNCH_TIMEOUT
    LOGS = Path(args.logs or args.work)
    LOGS.mkdir(parents=True, exist_ok=True)
    LAUNCH_TIMEOUT = args.launch_timeout
    import torch
    from zebra.data.synthetic import write_sft

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = write_sft(work / "sft.jsonl", n=300 if args.smoke else 12000, seed=0)
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "smoke": args.smoke}
    try:
        import deepspeed
        result["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    out = Path(args.out)
    signal.signal(signal.SIGTERM, on_terminate)
    for part in args.parts.split(","):
        try:
            run_part(part, args, work, data, result, out)
        except SystemExit as stop:  # the call's timeout: keep the parts done and say which one was cut short
            result.setdefault(part, {})["terminated"] = str(stop)
            write_json_atomic(out, result)
            raise
        write_json_atomic(out, result)
        print(json.dumps(result, indent=1, default=str)[-6000:], flush=True)


PARTS = ("zebra8b", "equivalence", "twonode", "paper8b")


def run_part(part: str, args, work: Path, data: Path, result: dict, out: Path) -> None:
    if part == "equivalence":
        def save(partial):  # what is known so far survives a timeout of the whole call
            write_json_atomic(out, dict(result, equivalence=partial))

        result[part] = equivalence(args, work, data, args.tokenizer, args.strategies.split(","), save)
    else:
        result[part] = {"zebra8b": zebra8b, "twonode": twonode, "paper8b": paper8b}[part](args, work, data,
                                                                                        args.tokenizer)


if __name__ == "__main__":
    main()
