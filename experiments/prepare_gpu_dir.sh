#!/usr/bin/env bash
# Prepare `.gpu/` (git-excluded; carried to the lent GPU machine with `carry: [".gpu"]`):
#  1. the shared wheels and bootstrap (../shared/gpu/stage.sh: mamba_ssm, deepspeed, hydra, datasets, ...);
#  2. the Hydra submitit launcher and its needs (pure Python), so that train.py's launcher plugin imports there
#     as it does here (otherwise every launch prints an import error for hydra_plugins.zebra_launcher), and gguf;
#  3. a copy of the SmolLM2 tokenizer (`model.tokenizer=.gpu/tokenizer` where the teacher itself is not brought over;
#     the GPU machine has no network and no HF cache). The teacher's weights (98 MB) do not fit one call's carry:
#     ../shared/gpu/stage-teacher.sh splits them for two staging calls, and restore-teacher.sh joins them there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -f ../shared/gpu/stage.sh ]; then bash ../shared/gpu/stage.sh; fi
mkdir -p .gpu/wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
  hydra-submitit-launcher==1.2.0 submitit==1.5.4 cloudpickle==3.1.3
# gguf (pure Python; its needs numpy, pyyaml, requests, tqdm are in the device image): transformers reads the
# embedded teacher's GGUF through it when restore-teacher.sh has brought the teacher over
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels \
  "gguf==$("$PY" -c "import importlib.metadata as m; print(m.version('gguf'))")"
# the tokenizer files of the default teacher's converted cache (zebra.compose.teacher converts the GGUF on first use
# into $ZEBRA_CACHE/teachers/gguf-<digest>/, weights and tokenizer together): the tokenizer files only
src=$("$PY" -c "from zebra.compose.teacher import cached_gguf_dir, embedded_gguf_path
print(cached_gguf_dir(embedded_gguf_path())[0])" | tail -n 1)  # the last line: imports may log to stdout
rm -rf .gpu/tokenizer && mkdir -p .gpu/tokenizer
for f in tokenizer.json tokenizer_config.json tokenizer.model special_tokens_map.json chat_template.jinja; do
  if [ -f "$src/$f" ]; then cp "$src/$f" .gpu/tokenizer/; fi
done
[ -f .gpu/tokenizer/tokenizer.json ] || { echo "no tokenizer.json in $src" >&2; exit 1; }
du -sh .gpu
