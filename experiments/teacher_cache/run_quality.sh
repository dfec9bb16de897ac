#!/usr/bin/env bash
# Quality of KD from the teacher cache (k = 64) vs online KD on the one-GPU recipe (smollm2_gpu), in one run: the
# same ILD'd students and SMART selection, the same KD token budget, then held-out KL and perplexity of each KD'd
# hybrid from the eval stage. Writes quality_online.json, quality_cache.json and quality.json beside this script.
#   bash experiments/teacher_cache/run_quality.sh            (ZEBRA_ROOT: where the artifacts go; default ./artifacts)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="${ZEBRA_ROOT:-$PWD/artifacts/teacher_cache_quality}"
k="${TOP_K:-64}"
run=(python train.py +experiment=smollm2_gpu trainer=gpu "paths.root=$root")
eval_dir="$root/smollm2_135m/6mla-smart/eval"

"${run[@]}" stage=pipeline "stage.order=[ilkd,smart]"
"${run[@]}" stage=kd
"${run[@]}" stage=eval
cp "$eval_dir/report.json" "$here/quality_online.json"
"${run[@]}" stage=teacher_cache "teacher_cache.top_k=$k"
"${run[@]}" stage=kd kd.teacher_source=cache "teacher_cache.top_k=$k"
"${run[@]}" stage=eval kd.teacher_source=cache "teacher_cache.top_k=$k"
cp "$eval_dir/report.json" "$here/quality_cache.json"
cp "$root/smollm2_135m/teacher_cache/report.json" "$here/cache_build_report.json"
python - "$here" "$k" <<'PY'
import json, sys
from pathlib import Path

here, k = Path(sys.argv[1]), int(sys.argv[2])
online, cache = (json.loads((here / f"quality_{s}.json").read_text())["models"] for s in ("online", "cache"))
rows = {}
for name in online:
    if name == "teacher" or name not in cache:
        continue
    row = {}
    for key in ("heldout_kl", "perplexity"):
        a, b = online[name].get(key), cache[name].get(key)
        row[key] = {"online": a, "cache": b, "relative": (b - a) / a if a and b is not None else None}
    rows[name] = row
    print(name, json.dumps(row))
(here / "quality.json").write_text(json.dumps({"top_k": k, "models": rows}, indent=2) + "\n")
PY
