#!/bin/bash
# The GPU test modules on the lent machine (see ../shared/gpu/README.md): the stages through plain Lightning and
# DeepSpeed first (they need the embedded teacher restored), then the kernel tests, each log and JUnit XML to $OUT.
#   source .gpu/bootstrap.sh && bash /tmp/zt/restore-teacher.sh && bash tests/gpu/run_on_device.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export ZEBRA_CACHE=${ZEBRA_CACHE:-/tmp/zebra-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
run() {  # name, seconds, pytest args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/$name.xml" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "== $name: rc=$? ($(tail -n 1 "$OUT/$name.log"))"
}
run stages 420 tests/gpu/test_stages_gpu.py
run kernels 150 tests/gpu/test_mamba_kernels.py tests/gpu/test_fused_kernels.py tests/gpu/test_generation_graphs.py
