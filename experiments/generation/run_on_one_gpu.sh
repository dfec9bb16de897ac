#!/usr/bin/env bash
# The generation measurements on one card (or the first card of a bigger machine), one part per call:
#   source .gpu/bootstrap.sh && bash experiments/generation/run_on_one_gpu.sh bench    (~8 min: the whole benchmark)
#   source .gpu/bootstrap.sh && bash experiments/generation/run_on_one_gpu.sh tests    (~5 min: the GPU tests)
#   source .gpu/bootstrap.sh && bash experiments/generation/run_on_one_gpu.sh compile  (torch.compile'd steps, 32k x 8)
#   source .gpu/bootstrap.sh && bash experiments/generation/run_on_one_gpu.sh latent   (~6 min: latent sweep + bench)
# (carry .gpu; JSON + logs land in $OUT). The base runs first, so that a failure late in the hybrid's largest-batch
# search cannot cost the base's figures; the decode-attention kernels timed are matmul and triton (sdpa was the
# slowest for both models at every context).
set -u
OUT=${OUT:-/tmp/zebra-generation}
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
case "${1:-bench}" in
  bench)
    timeout "${BENCH_TIMEOUT:-540}" python3 -m benchmarks.generation --profile --models llama,zebra \
      --kernels matmul,triton --out "$OUT/generation_bench.json" > "$OUT/generation_bench.log" 2>&1
    echo "generation benchmark rc=$?"; grep -v "^\s*$" "$OUT/generation_bench.log" | tail -n 80 | cut -c1-250 ;;
  compile)  # both models' steps torch.compile'd before the capture, at 32k x 8 only (each new cache recompiles)
    timeout "${BENCH_TIMEOUT:-540}" python3 -m benchmarks.generation --compile --models llama,zebra --contexts 32768 \
      --kernels triton --skip-max-batch --profile --out "$OUT/generation_compile.json" > "$OUT/generation_compile.log" 2>&1
    echo "compiled generation benchmark rc=$?"; grep -v "^\s*$" "$OUT/generation_compile.log" | tail -n 40 | cut -c1-250 ;;
  latent)  # the latent decode-attention kernel's launch sweep (batch 8 and 739 at 32k), then the whole benchmark
    timeout "${SWEEP_TIMEOUT:-220}" python3 experiments/decode_attention/decode_large_batch.py \
      --latent-sweep "$OUT/latent_sweep.jsonl" \
      > "$OUT/latent_sweep.log" 2>&1
    echo "latent sweep rc=$?"
    python3 - "$OUT/latent_sweep.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for b in sorted({r["batch"] for r in rows}):
    ok = sorted((r for r in rows if r["batch"] == b and "ms" in r), key=lambda r: r["ms"])
    for r in ok[:6] + [r for r in ok if r["kernel"].endswith("default") or r["kernel"] == "matmul"]:
        print(b, r["kernel"], r.get("block_s"), r.get("num_warps"), r.get("num_stages"), r.get("splits"),
              f'{r["ms"]:.4f} ms {r["GBps"]:.0f} GB/s err {r["rel_err"]:.4f}')
    print(b, "errors:", sum("error" in r for r in rows if r["batch"] == b))
PY
    [ "${2:-}" = sweep-only ] || bash "$0" bench ;;
  tests)
    # SIGINT at the limit: pytest then still prints which tests failed and why
    timeout -s INT "${TESTS_TIMEOUT:-400}" python3 -m pytest -q -rf --tb=short -m gpu tests/gpu tests/bench \
      > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests rc=$?"; tail -n 40 "$OUT/gpu_tests.log" | cut -c1-250 ;;
  *) echo "usage: run_on_one_gpu.sh bench|compile|latent|tests" >&2; exit 2 ;;
esac
