#!/usr/bin/env bash
# Where a graphed decode step departs from the eager one, in one short call on one card:
#   source .gpu/bootstrap.sh && bash experiments/decode_graph_check/run_checks.sh   (carry .gpu; JSON + logs in $OUT)
# 1. llama_graph_trace.py: module-by-module replay vs eager at the benchmark's check settings, and at the probe's;
# 2. llama_graph_grid.py: the benchmark's check over preset x inference mode x warm-up x prompt;
# 3. the graph and fused-kernel GPU tests.
set -u
OUT=${OUT:-/tmp/zebra-graph-check}
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
D=experiments/decode_graph_check
timeout 120 python3 $D/llama_graph_trace.py --out "$OUT/trace_full_w3_p256.json" > "$OUT/trace_full_w3_p256.log" 2>&1
timeout 90 python3 $D/llama_graph_trace.py --warmup 1 --prompt 12 --out "$OUT/trace_full_w1_p12.json" \
  > "$OUT/trace_full_w1_p12.log" 2>&1
timeout 150 python3 $D/llama_graph_grid.py --presets full,smoke --out "$OUT/llama_graph_grid.json" \
  > "$OUT/llama_graph_grid.log" 2>&1
timeout 150 python3 -m pytest -q -m gpu tests/gpu/test_generation_graphs.py tests/gpu/test_fused_kernels.py -x -q \
  > "$OUT/gpu_tests.log" 2>&1
for f in "$OUT"/*.log; do echo "==> $f"; tail -n 30 "$f"; done | cut -c1-250
