#!/usr/bin/env bash
# One device call on a four-GPU machine that does the work of two two-GPU calls side by side (device time is
# rationed; each machine start costs minutes):
#   GPUs 0,1: issue 5's equivalence runs (ZeRO-3 and ZeRO-2, one GPU vs two), then the Llama graph probe and the
#             fused-kernel before/after of the hybrid's decode step on GPU 0, the GPU tests on GPU 1;
#   GPUs 2,3: issue 5's zebra_8b `kd` across two GPUs, then issue 7's benchmarks (training on GPU 2, generation
#             on GPU 3).
# Each pair's jobs see only their own cards (CUDA_VISIBLE_DEVICES), so neither shares memory or SMs with the other.
#   source .gpu/bootstrap.sh && bash experiments/gpu_x4_pairs.sh      (carry .gpu; JSON + logs.tgz land in $OUT)
set -u
OUT=${OUT:-/tmp/zebra-x4}
DEADLINE=${DEADLINE:-565}   # seconds after which nothing new starts (the call's limit is 600)
L=/tmp/x4-logs
mkdir -p "$OUT" "$L"
left() { echo $(( DEADLINE - SECONDS )); }

(
  export CUDA_VISIBLE_DEVICES=0,1
  timeout 400 python3 experiments/scale_gpu.py --parts equivalence --strategies deepspeed_zero3,deepspeed_zero2 \
    --launch-timeout 230 --work /tmp/zs --out "$OUT/scale_gpu_equivalence.json" --logs "$L"
  CUDA_VISIBLE_DEVICES=1 timeout $(( $(left) > 150 ? 150 : $(left) )) python3 -m pytest -q -m gpu \
    tests/gpu/test_generation_graphs.py tests/gpu/test_fused_kernels.py tests/bench > "$L/gpu_tests.log" 2>&1 &
  export CUDA_VISIBLE_DEVICES=0
  timeout 60 python3 experiments/llama_graph_probe.py > "$L/llama_graph_probe.log" 2>&1
  gen="python3 -m zebra.bench.generation --models zebra --contexts 32768 --skip-max-batch --profile"
  half=$(( $(left) / 2 ))
  [ "$half" -gt 20 ] && timeout $half $gen --out "$OUT/gen_fused.json" > "$L/gen_fused.log" 2>&1
  [ "$(left)" -gt 20 ] && ZEBRA_FUSED_KERNELS=0 timeout $(left) $gen --out "$OUT/gen_eager.json" > "$L/gen_eager.log" 2>&1
  wait
) > "$L/pair01.log" 2>&1 &
pair01=$!

(
  export CUDA_VISIBLE_DEVICES=2,3
  timeout 260 python3 experiments/scale_gpu.py --parts zebra8b --work /tmp/z8 --out "$OUT/scale_gpu_zebra8b.json" \
    --logs "$L"
  BENCH_GPUS=2,3 BENCH_TIMEOUT=$(left) SKIP_GPU_TESTS=1 GEN_ARGS=--profile OUT="$L" bash experiments/gpu_bench.sh
  cp "$L/training_bench.json" "$L/generation_bench.json" "$OUT/" 2>/dev/null
) > "$L/pair23.log" 2>&1 &
pair23=$!

wait $pair01 $pair23
tail -n 30 "$L/pair01.log" "$L/pair23.log" "$L/gpu_tests.log" "$L/llama_graph_probe.log"
tar czf "$OUT/logs.tgz" -C "$L" .
