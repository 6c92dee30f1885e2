# dissect_fast: make install | demo | test | bench
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-gpu bench lint docs clean gpu-wheels gpu-check gpu-check-dry

install: $(STAMP)

$(STAMP): setup.py requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -e . --no-deps
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/dissect-fast demo --out runs/demo

# ruff check (rules in ruff.toml), ruff format --check and mypy (mypy.ini: the package and kernels/), before the tests
lint: install
	$(BIN)/ruff check --no-cache .
	$(BIN)/ruff format --no-cache --check .
	$(BIN)/mypy

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

test-gpu: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu tests

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.bench_train --device cpu --tiny

# the tables of measured numbers in README.md and docs/ from their result files (scripts/render_docs.py)
docs: install
	$(BIN)/python scripts/render_docs.py

clean:
	rm -rf $(VENV) runs build *.egg-info .mypy_cache

# ---------------------------------------------------------------------------------------- GPU session
# The GPU machine is offline and lacks these (it has torch, triton, torchvision, numpy, pandas, pytest, timm,
# tqdm, huggingface_hub, safetensors, ...): pinned to the versions in .venv, wheels for CPython 3.12 manylinux
# x86_64 in .whl/ (ignored; pass it with carry: [".whl"]). gpu_check.py installs the ones whose module does not
# import (regex: open_clip's tokenizer; PyYAML: webdataset's) and stops, exit code 3, if one still does not.
GPU_WHEELS := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 webdataset==1.0.2 braceexpand==0.1.7 PyYAML==6.0.4 regex==2026.12.2
CHECK_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
# CALL=1: pytest -m gpu, bench_select, eager end to end, torch loader on photo JPEGs; CALL=2: compiled rows,
# the profile window, the sync check, --data-backend gpu vs torch. Each <= 5 minutes; no CALL: both, one after
# the other (results in call-1/ and call-2/)
CALL ?= all

gpu-wheels:
	$(CHECK_PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	@du -ch .whl/*.whl | tail -1

# the GPU check (python -m benchmarks.gpu_check): results to $OUT, else benchmarks/results/gpu-check-DATE/
gpu-check:
	HF_HUB_OFFLINE=1 $(CHECK_PY) -m benchmarks.gpu_check --call $(CALL) --wheel-list "$(GPU_WHEELS)" \
		--out "$${OUT:-benchmarks/results/gpu-check-$$(date +%F)}" $(GPU_CHECK_ARGS)

# both calls' phases on CPU with a tiny model (about 3 minutes): run it before spending GPU time
gpu-check-dry:
	HF_HUB_OFFLINE=1 $(CHECK_PY) -m benchmarks.gpu_check --dry-run --call $(CALL) --wheel-list "$(GPU_WHEELS)" \
		--out "$${OUT:-/tmp/gpu-check-dry}" $(GPU_CHECK_ARGS)
