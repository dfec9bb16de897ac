#!/usr/bin/env bash
# Device calls on a four-GPU machine that each do the work of two two-GPU calls side by side (device time is
# rationed; each machine start costs a minute). Each pair's jobs see only their own cards (CUDA_VISIBLE_DEVICES),
# so neither shares memory or SMs with the other. Carry .gpu; JSON and logs.tgz land in $OUT.
#   source .gpu/bootstrap.sh && bash experiments/deepspeed_scaling/run_pairs_on_four_gpus.sh equivalence
#       GPUs 0,1: the ZeRO-3 equivalence (one GPU vs two); GPUs 2,3: the same for ZeRO-2
#   source .gpu/bootstrap.sh && bash experiments/deepspeed_scaling/run_pairs_on_four_gpus.sh rest
#       GPUs 2,3: zebra_8b `kd` across two GPUs; GPU 0: the decode graph check, then the GPU tests;
#       GPU 1: the generation benchmark
set -u
OUT=${OUT:-/tmp/zebra-x4}
L=/tmp/x4-logs
mkdir -p "$OUT" "$L"
case "${1:-}" in
  equivalence)
    T=${T:-480}
    for lane in "0,1 deepspeed_zero3" "2,3 deepspeed_zero2"; do
      set -- $lane
      CUDA_VISIBLE_DEVICES=$1 timeout $T python3 experiments/deepspeed_scaling/scale_gpu.py --parts equivalence --strategies $2 \
        --launch-timeout 330 --work /tmp/eq-$2 --out "$OUT/scale_gpu_equivalence_$2.json" --logs "$L/$2" \
        > "$L/driver-$2.log" 2>&1 &
    done
    wait
    ;;
  rest)
    T=${T:-330}
    CUDA_VISIBLE_DEVICES=2,3 timeout $T python3 experiments/deepspeed_scaling/scale_gpu.py --parts zebra8b --work /tmp/z8 \
      --zebra8b-timeout $((T - 40)) --out "$OUT/scale_gpu_zebra8b.json" --logs "$L" > "$L/driver-zebra8b.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 timeout $T python3 -m benchmarks.generation --profile --out "$OUT/generation_bench.json" \
      > "$L/generation_bench.log" 2>&1 &
    (
      export CUDA_VISIBLE_DEVICES=0
      timeout 150 python3 experiments/decode_graph_check/llama_graph_grid.py --kernels matmul,triton --out "$OUT/llama_graph_grid.json" \
        > "$L/llama_graph_grid.log" 2>&1
      timeout $((T - SECONDS - 5)) python3 -m pytest -q -m gpu tests/gpu/test_generation_graphs.py \
        tests/gpu/test_fused_kernels.py tests/bench > "$L/gpu_tests.log" 2>&1
    ) &
    wait
    ;;
  *) echo "usage: $0 equivalence|rest" >&2; exit 2 ;;
esac
for f in "$L"/*.log; do echo "==> $f"; tail -n 12 "$f"; done 2>/dev/null | cut -c1-300
tar czf "$OUT/logs.tgz" -C "$L" .
