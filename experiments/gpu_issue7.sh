#!/usr/bin/env bash
# Issue 7's remaining GPU work in one device call on one card (or the first card of a bigger machine):
#   source .gpu/bootstrap.sh && bash experiments/gpu_issue7.sh          (carry .gpu; JSON + logs.tgz land in $OUT)
# 1. which setting makes the base's graphed decode step disagree: the benchmark's own check over a grid
#    (llama_graph_grid.py) and the probe at the 8B shape (llama_graph_probe.py full);
# 2. the whole generation benchmark (both models, every context, largest batch, --profile);
# 3. the GPU tests (static-cache decode graphs, fused kernels incl. the 64-bit-offset test, the benchmarks).
# Each step has its own time limit, so one that hangs or crashes does not take the rest of the call with it.
set -u
OUT=${OUT:-/tmp/zebra-issue7}
DEADLINE=${DEADLINE:-570}
L=/tmp/issue7-logs
mkdir -p "$OUT" "$L"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
left() { echo $(( DEADLINE - SECONDS )); }
timeout 120 python3 experiments/llama_graph_grid.py --kernels matmul,triton --out "$OUT/llama_graph_grid.json" \
  > "$L/llama_graph_grid.log" 2>&1
timeout 60 python3 experiments/llama_graph_probe.py full > "$L/llama_graph_probe_full.log" 2>&1
[ "$(left)" -gt 150 ] && timeout $(( $(left) - 100 )) python3 -m zebra.bench.generation --profile \
  --out "$OUT/generation_bench.json" > "$L/generation_bench.log" 2>&1
[ "$(left)" -gt 20 ] && timeout $(left) python3 -m pytest -q -m gpu tests/gpu tests/bench > "$L/gpu_tests.log" 2>&1
for f in "$L"/*.log; do echo "==> $f"; tail -n 15 "$f"; done | cut -c1-300
tar czf "$OUT/logs.tgz" -C "$L" .
