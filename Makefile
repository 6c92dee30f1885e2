# dissect_fast: make install | demo | test | bench
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-gpu bench lint clean

install: $(STAMP)

$(STAMP): setup.py requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install -e . --no-deps
	touch $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/dissect-fast demo --out runs/demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

test-gpu: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m gpu tests

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_train.py --device cpu --tiny

clean:
	rm -rf $(VENV) runs build *.egg-info
