#!/bin/bash
# The GPU test modules on the lent machine (see ../shared/gpu/README.md): the stages through plain Lightning and
# DeepSpeed first (they need the embedded teacher restored), then the kernel tests, one at a time, each log and
# JUnit XML to $OUT
# (GPU_TESTS_TAR=path: also one archive of them, for a call whose $OUT holds other results too). The carried .gpu is
# made by experiments/prepare_gpu_dir.sh.
#   source .gpu/bootstrap.sh && bash /tmp/zt/restore-teacher.sh && bash tests/gpu/run_on_device.sh [stages|others]
# Both parts together can outlast one 10-minute device call on a fresh machine: name one part per call (the second
# call, on the still-warm machine, finds Triton's kernels and autotune choices on disk).
set -uo pipefail
part=${1:-all}
case "$part" in all|stages|others) ;; *) echo "usage: run_on_device.sh [stages|others]" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export ZEBRA_CACHE=${ZEBRA_CACHE:-/tmp/zebra-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
run() {  # name, seconds, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -v -rP --durations=0 -m gpu -p no:cacheprovider --junitxml="$OUT/$name.xml" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? ($(tail -n 1 "$OUT/$name.log"))"
}
# one after the other: two test processes side by side thrash the CPU linear algebra (the students' SVD init) on the
# machine's cores, and both run past their limits (experiments/quality/README.md)
# the stage tests start six train.py processes (each loads the teacher and builds its models): on a warm H100 the
# first five took over 300 s, so they need a call of their own (the sixth, kd under ZeRO-2, was cut at 330 s)
if [ "$part" != others ]; then run stages "${STAGES_TIMEOUT:-570}" tests/gpu/test_stages_gpu.py; fi
# the kernel tests autotune mamba_ssm on a fresh machine: their first six cases alone took ~190 s on an H100
if [ "$part" != stages ]; then
  run others "${OTHERS_TIMEOUT:-360}" tests/gpu/test_mamba_kernels.py tests/gpu/test_fused_kernels.py \
    tests/gpu/test_generation_graphs.py tests/data/test_teacher_generated.py tests/stages/test_losses.py \
    tests/bench/test_training_bench.py
fi
if [ -n "${GPU_TESTS_TAR:-}" ]; then tar czf "$GPU_TESTS_TAR" -C "$OUT" .; fi
