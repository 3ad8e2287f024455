# Set-up and the two main commands. Each target installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: install chromium run test bench ui clean

# torch first, from the CPU wheel (a plain `pip install torch` would pull GBs of CUDA packages).
# GPU users: install a CUDA build of torch into the venv first (see README); this keeps it.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m rm_lib run

# The browser test of the Dagster UI drives Debian's Chromium (Playwright's own browsers are not
# used). Installed when missing, where apt-get may run (root or password-less sudo); elsewhere that
# test skips with its reason.
chromium:
	@command -v chromium >/dev/null || { \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive sh -c \
	    'apt-get update -qq && apt-get install -y -qq chromium chromium-driver' \
	  || echo "chromium not installed: the browser test will skip" >&2; }

test: install chromium
	$(PY) -m pytest -q

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/bench_tokenize.py
	$(PY) benchmarks/bench_train.py --max-train-pairs 400 --max-test-pairs 400

ui: install
	mkdir -p .dagster_home
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(VENV)/bin/dagster dev -m orchestration.definitions -h 127.0.0.1 -p 3000

clean:
	rm -rf data models wandb
