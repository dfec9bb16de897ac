#!/usr/bin/env bash
# The quality benchmark on one GPU (benchmarks/quality; README.md beside this file). On the device, after the two
# teacher staging calls of ../shared/gpu/stage-teacher.sh, in one call that carries .gpu (made by
# experiments/prepare_gpu_dir.sh, which adds gguf and the launcher to the shared wheels):
#   source .gpu/bootstrap.sh && bash /tmp/zt/restore-teacher.sh && bash experiments/quality/run_on_one_gpu.sh
# Parts (the first argument):
#   bench   (default) the runs that have no result yet in experiments/quality/quality_bench.json: the recipe first,
#           then no_ild, uniform, init_old, init_new, kd_cache; the JSON is written after every run, so a call cut off by its
#           time limit keeps the finished ones, and the same command on the next call goes on from there
#   recipe  the recipe alone (+experiment=smollm2_gpu: ilkd -> smart -> kd -> dpo, then its evaluation)
#   only R  the runs named in R (comma-separated, e.g. recipe,kd_cache), run again even where they have a result
#   curve   KD for longer (48M tokens) with held-out perplexity every 100 steps, resumed from its checkpoint by
#           the next call while the machine stays warm (the artifacts live in /tmp/zebra-quality)
# Extra arguments go to the benchmark (e.g. --set data=teacher_generated). JSON, plot, log and curve land in $OUT;
# copy quality_bench.json and quality.png into experiments/quality/ afterwards, so that the next call merges into it.
set -u
OUT=${OUT:-/tmp/zebra-quality-out}
ROOT=${QUALITY_ROOT:-/tmp/zebra-quality}
mkdir -p "$OUT" "$ROOT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} HYDRA_FULL_ERROR=1
here=experiments/quality
# the results of earlier calls, which this one merges into: the copy a call on this (still warm) machine left beside
# its artifacts, else the one in this folder
if [ -f "$ROOT/quality_bench.json" ]; then cp "$ROOT/quality_bench.json" "$OUT/quality_bench.json"
elif [ -f "$here/quality_bench.json" ]; then cp "$here/quality_bench.json" "$OUT/quality_bench.json"; fi
part=${1:-bench}
[ $# -gt 0 ] && shift
case "$part" in
  bench) args=(--missing) ;;
  recipe) args=(--only recipe) ;;
  curve) args=(--only curve) ;;
  only) [ $# -gt 0 ] || { echo "usage: run_on_one_gpu.sh only RUN[,RUN...]" >&2; exit 2; }
        args=(--only "$1"); shift ;;
  *) echo "usage: run_on_one_gpu.sh [bench|recipe|curve|only RUNS] [benchmark arguments]" >&2; exit 2 ;;
esac
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# SIGINT at the limit: the benchmark stops inside a run, after saving every run that finished
timeout -s INT -k 15 "${BENCH_TIMEOUT:-540}" python3 -m benchmarks.quality "${args[@]}" --root "$ROOT" \
  --out "$OUT/quality_bench.json" --plot "$OUT/quality.png" "$@" > "$OUT/quality_bench.log" 2>&1
rc=$?
echo "quality benchmark rc=$rc wall=$(( $(date +%s) - start ))s"
if [ -f "$OUT/quality_bench.json" ]; then cp "$OUT/quality_bench.json" "$ROOT/quality_bench.json"; fi
if [ -f "$ROOT/curve.jsonl" ]; then cp "$ROOT/curve.jsonl" "$OUT/"; fi
recipe_eval=$(ls -d "$ROOT"/recipe/*/*mla-smart/eval 2>/dev/null | head -n 1)
if [ -n "$recipe_eval" ] && [ -f "$recipe_eval/report.md" ]; then cp "$recipe_eval/report.md" "$OUT/recipe_eval.md"; fi
# what each stage took (the lines the stages log) and the benchmark's table and verdict
grep -E "pipeline: running|done:|Trainer.fit. stopped|^\[ *[0-9.]+s\]|^\||^targets|^  " "$OUT/quality_bench.log" \
  | cut -c1-250 | tail -n 70
exit $rc
