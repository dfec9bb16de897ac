#!/usr/bin/env bash
# Prepare `.gpu/` (git-excluded; carried to the lent GPU machine with `carry: [".gpu"]`):
#  1. the shared wheels and bootstrap (../shared/gpu/stage.sh: mamba_ssm, deepspeed, hydra, datasets, ...);
#  2. the Hydra submitit launcher and its needs (pure Python), so that train.py's launcher plugin imports there
#     as it does here (otherwise every launch prints an import error for hydra_plugins.zebra_launcher);
#  3. a copy of the SmolLM2 tokenizer the recipes use (the GPU machine has no network and no HF cache).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -f ../shared/gpu/stage.sh ]; then bash ../shared/gpu/stage.sh; fi
mkdir -p .gpu/wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
  hydra-submitit-launcher==1.2.0 submitit==1.5.4 cloudpickle==3.1.3
# the tokenizer: converted from the GGUF of the default teacher on first use, cached under ~/.cache/zebra
"$PY" -c "from zebra.stages.teacher import load_model_tokenizer; load_model_tokenizer('default')" >/dev/null
src=$(ls -d "${ZEBRA_CACHE:-$HOME/.cache/zebra}"/tokenizers/SmolLM2-135M-Instruct-* | head -n 1)
rm -rf .gpu/tokenizer && cp -r "$src" .gpu/tokenizer
du -sh .gpu
