"""Where does the base's CUDA-graphed decode step part from its eager step? (generation benchmark, 2026-11-28: at
the Llama-3.1-8B shape the graphed static-cache step had rel_err ~1.37 against the eager decode, for every
attention kernel, while the same step run eagerly agreed; at small shapes the replay was exact.)

This follows the benchmark's check (`Bench.check` / `_check_kernel`) step by step, under inference mode as the
benchmark runs: reference decode, static cache, prefill, `Step` (warm-up on a side stream, capture), back to the
state after the prefill, one replay; then back again, one eager step. A forward hook on every module copies the
module's output into a buffer made at the first (eager) call, so the copies are part of the captured graph too.
Printed: each module's output difference (replay vs eager) in execution order, the first that differs, and the
K cache slots each path wrote. One call, well under a minute on one GPU:

    source .gpu/bootstrap.sh
    python experiments/decode_graph_check/llama_graph_trace.py [--preset full|smoke] [--out trace.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.generation import run as G  # noqa: E402


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return getattr(out, "last_hidden_state", None)


class Recorder:
    """Forward hooks that copy every module's (first) output into a buffer of its own, made at the first call."""

    def __init__(self, model):
        self.bufs, self.order, self.on = {}, [], False
        self.handles = [m.register_forward_hook(self.hook(name or "<model>")) for name, m in model.named_modules()]

    def hook(self, name):
        def f(module, args, out):
            if not self.on:
                return
            t = first_tensor(out)
            if t is None:
                return
            if name not in self.bufs:
                if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                    return  # a module first seen inside the capture: nothing to compare
                self.bufs[name] = torch.empty_like(t)
                self.order.append(name)
            if self.bufs[name].shape == t.shape:
                self.bufs[name].copy_(t)

        return f

    def snapshot(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {k: v.detach().float().cpu().clone() for k, v in self.bufs.items()}

    def close(self):
        for h in self.handles:
            h.remove()


def slots_written(runner, cache, layer=0):
    k = runner._kv(cache)[2 * layer]
    return torch.nonzero(k[0, 0].abs().sum(-1)).flatten().tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="full")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--kernel", default="matmul")
    ap.add_argument("--no-inference-mode", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: checks the script (no graph there)")
    cli = ap.parse_args()
    preset = G.SMOKE_PRESET if cli.preset == "smoke" else G.load_preset(G.PRESET)
    args = G.parse_args(["--device", cli.device, "--kernels", cli.kernel, "--warmup", str(cli.warmup),
                         "--check-prompt", str(cli.prompt), "--out", ""])
    dev = G.Device(cli.device)
    runner = G.RUNNERS["llama"](preset, cli.device, torch.bfloat16, 0)
    runner.set_kernel(cli.kernel)
    b, p, n = 2, cli.prompt, 2
    g = torch.Generator(device="cpu").manual_seed(1)
    vocab = runner.config.vocab_size
    prompt = torch.randint(0, vocab, (b, p), generator=g).to(cli.device)
    forced = [torch.randint(0, vocab, (b, 1), generator=g).to(cli.device) for _ in range(n)]
    mode = contextlib.nullcontext() if cli.no_inference_mode else torch.inference_mode()
    report = {"preset": cli.preset, "warmup": cli.warmup, "prompt": p, "kernel": cli.kernel,
              "inference_mode": not cli.no_inference_mode}
    with mode:
        ref = torch.cat(runner.reference_decode(prompt, forced), 1).float()
        rec = Recorder(runner.model)
        cache = runner.new_cache(b, p + n + cli.warmup + 4)
        ids = forced[0].clone()
        pos = torch.full((1,), p, dtype=torch.long, device=cli.device)

        def restart():
            runner.reset(cache)
            runner.prefill(cache, prompt, args.chunk)
            runner.set_position(cache, pos, p)

        runner.prefill(cache, prompt, args.chunk)
        rec.on = True
        step = G.Step(dev, runner.make_step(cache, ids, pos, greedy=False), cli.warmup)
        rec.on = False
        restart()
        ids.copy_(forced[0])
        rec.on = True
        last = step.run()
        graph_logits = (step.output if step.output is not None else last).float().clone()
        rec.on = False
        graphed = rec.snapshot()
        graph_slots = slots_written(runner, cache)
        report["graph_length_after"] = int(cache.layers[0].cumulative_length)
        step.close()

        restart()
        ids.copy_(forced[0])
        rec.on = True
        eager_logits = runner.make_step(cache, ids, pos, greedy=False)().float().clone()
        rec.on = False
        eager = rec.snapshot()
        eager_slots = slots_written(runner, cache)
        rec.close()

    def rel(a, r):
        return ((a - r).norm() / r.norm().clamp_min(1e-30)).item()

    rows = [{"module": k, "rel_diff": rel(graphed[k], eager[k]), "shape": list(eager[k].shape)}
            for k in rec.order if k in graphed and graphed[k].shape == eager[k].shape]
    first = next((r for r in rows if r["rel_diff"] > 1e-3), None)
    report.update(graph_vs_eager_logits=rel(graph_logits, eager_logits),
                  graph_vs_reference=rel(graph_logits, ref[:, :1]), eager_vs_reference=rel(eager_logits, ref[:, :1]),
                  first_divergent=first, graph_slots_layer0=graph_slots, eager_slots_layer0=eager_slots,
                  modules=rows)
    for k in ("graph_vs_eager_logits", "graph_vs_reference", "eager_vs_reference", "first_divergent",
              "graph_length_after"):
        print(k, json.dumps(report[k]), flush=True)
    print("slots written by the replay (layer 0):", graph_slots[-4:], " by the eager step:", eager_slots[-4:])
    shown = 0
    for r in rows:
        if r["rel_diff"] > 1e-3 or shown < 6:
            print(f"{r['rel_diff']:10.4g}  {r['module']}  {r['shape']}")
            shown += 1
        if shown >= 40:
            break
    if cli.out:
        Path(cli.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
