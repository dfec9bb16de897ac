"""Why does the base's CUDA-graphed decode step disagree with its eager step? (generation benchmark, 2026-11-28:
graphed rel_err 1.37 against transformers' eager decode for every attention kernel, while the same static-cache
step run eagerly agrees to 0.03-0.07; the hybrid's graphed step agrees.)

Ruled out on CPU: the step's operators take the same scalar arguments at every position, read no tensor that is
re-created between steps, call no .item(), and mix no CPU tensor into device work (checked on the meta device).

This runs the benchmark's own LlamaRunner at small shapes on one GPU and prints, after each graph replay and each
eager step: the cache length counter of layer 0, which slots of layer 0's keys hold data, and the logits'
difference to the eager step from the same state. One call, seconds:

    source .gpu/bootstrap.sh && python experiments/llama_graph_probe.py [full]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zebra.bench import generation as G  # noqa: E402


def written_slots(layer) -> list[int]:
    return torch.nonzero(layer.keys[0, 0].abs().sum(-1)).flatten().tolist()


def main() -> None:
    dev = torch.device("cuda")
    # `full`: the benchmark's 8B-shaped base instead of the smoke shapes (the grid's check fails at 8B)
    preset = G.load_preset(G.PRESET) if "full" in sys.argv[1:] else G.SMOKE_PRESET
    runner = G.RUNNERS["llama"](preset, dev, torch.bfloat16, 0)
    runner.set_kernel("matmul")
    b, p, n = 2, 12, 4
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, runner.config.vocab_size, (b, p), generator=g).to(dev)
    forced = [torch.randint(0, runner.config.vocab_size, (b, 1), generator=g).to(dev) for _ in range(n)]

    def fresh():
        cache = runner.new_cache(b, p + n + 8)
        runner.prefill(cache, prompt, 16)
        ids = forced[0].clone()
        pos = torch.full((1,), p, dtype=torch.long, device=dev)
        runner.set_position(cache, pos, p)
        return cache, ids, pos

    # eager: the reference for each step
    cache, ids, pos = fresh()
    step = runner.make_step(cache, ids, pos, greedy=False)
    eager = []
    for t in forced:
        ids.copy_(t)
        eager.append(step().float().clone())
    print("eager: length", int(cache.layers[0].cumulative_length), "slots", written_slots(cache.layers[0]))

    # graphed, captured right after the prefill (no warm-up on a side stream), then replayed
    cache, ids, pos = fresh()
    step = runner.make_step(cache, ids, pos, greedy=False)
    length = cache.layers[0].cumulative_length
    print("before capture: length", int(length), "on", length.device, "pos", int(pos))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # one warm-up step, as Step does
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    print("after warm-up: length", int(length), "pos", int(pos), "slots", written_slots(cache.layers[0]))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    torch.cuda.synchronize()
    print("after capture: length", int(length), "pos", int(pos), "(capture runs nothing)")
    # back to the state right after the prefill, as the benchmark's check does
    runner.reset(cache)
    runner.prefill(cache, prompt, 16)
    runner.set_position(cache, pos, p)
    print("after reset+prefill: length", int(cache.layers[0].cumulative_length), "same tensor:",
          cache.layers[0].cumulative_length is length, "slots", written_slots(cache.layers[0]))
    for i, t in enumerate(forced):
        ids.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        diff = (out.float() - eager[i]).norm() / eager[i].norm()
        print(f"replay {i}: length {int(cache.layers[0].cumulative_length)} pos {int(pos)} rel diff to eager "
              f"{diff.item():.4f} slots {written_slots(cache.layers[0])}")


if __name__ == "__main__":
    main()
