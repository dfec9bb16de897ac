#!/usr/bin/env bash
# The training and generation benchmarks in one call on a two-GPU machine (or one GPU, one after the other):
#   source .gpu/bootstrap.sh && bash benchmarks/run_on_two_gpus.sh      (carry .gpu; results land in $OUT)
# The training benchmark runs on GPU 0 and the generation benchmark on GPU 1 at the same time: each is timed on
# its own card (CUDA events), and neither shares memory or SMs with the other. Then the GPU tests of the
# static-cache decode path. Plots are drawn afterwards on CPU:
#   python -m benchmarks.generation --plot experiments/generation/generation_bench.json
# SMOKE=1 runs the same plumbing on CPU at tiny shapes (each benchmark's --smoke --device cpu).
set -u
T=${BENCH_TIMEOUT:-420}  # seconds for each benchmark (both write their JSON as they go)
GEN_ARGS=${GEN_ARGS:-}    # extra arguments of the generation benchmark (e.g. --profile)
TRAIN_ARGS=${TRAIN_ARGS:-}
GPUS=${BENCH_GPUS:-0,1}   # physical cards: training benchmark on the first, generation on the second
TRAIN_GPU=${GPUS%%,*}; GEN_GPU=${GPUS##*,}
OUT=${OUT:-/tmp/zebra-bench}
mkdir -p "$OUT"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
extra=""
if [ "${SMOKE:-0}" = "1" ]; then extra="--smoke --device cpu"; fi
if [ "$gpus" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=$TRAIN_GPU timeout $T python3 -m benchmarks.training $extra $TRAIN_ARGS --out "$OUT/training_bench.json" \
    > "$OUT/training_bench.log" 2>&1 &
  train_pid=$!
  CUDA_VISIBLE_DEVICES=$GEN_GPU timeout $T python3 -m benchmarks.generation $extra $GEN_ARGS --out "$OUT/generation_bench.json" \
    > "$OUT/generation_bench.log" 2>&1
  wait $train_pid
else
  timeout $T python3 -m benchmarks.training $extra $TRAIN_ARGS --out "$OUT/training_bench.json" > "$OUT/training_bench.log" 2>&1
  timeout $T python3 -m benchmarks.generation $extra $GEN_ARGS --out "$OUT/generation_bench.json" > "$OUT/generation_bench.log" 2>&1
fi
[ "${SMOKE:-0}" = "1" ] || [ "${SKIP_GPU_TESTS:-0}" = "1" ] || timeout 120 python3 -m pytest -q -m gpu tests/gpu/test_generation_graphs.py tests/gpu/test_fused_kernels.py tests/bench > "$OUT/gpu_tests.log" 2>&1
tail -n 25 "$OUT/training_bench.log" "$OUT/generation_bench.log" "$OUT/gpu_tests.log"
