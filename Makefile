# Set-up and the main commands. Each target installs what it needs first; install output goes to
# .install.log (one line says so).
PYTHON   ?= python3
VENV     ?= .venv
DVC_VENV ?= .venv-dvc
PY       := $(VENV)/bin/python
LOG      := $(CURDIR)/.install.log
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= disabled

.PHONY: install chromium run test test-integration test-all lint mutants bench ui exp clean

# torch first, from the CPU wheel (a plain `pip install torch` would pull GBs of CUDA packages).
# PyPI's torch is the CUDA build; PyTorch's CPU index has the same release as 2.13.0+cpu, which pip
# prefers (a local wheel of it, where pip is pointed at one, serves as well).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Asked first (configs/index_answers.py): pip retries an index it cannot reach for each package.
# GPU users: install a CUDA build of torch into the venv first (see README); this keeps it.
# DVC gets its own environment (configs/requirements-dvc.txt says why), linked as $(VENV)/bin/dvc;
# it installs beside the main one, at the same time.
$(VENV)/.installed: pyproject.toml configs/requirements-dvc.txt
	@echo "installing into $(VENV) and $(DVC_VENV) (a few minutes the first time); output in $(LOG)"
	@{ { $(PYTHON) -m venv $(DVC_VENV) && \
	    $(DVC_VENV)/bin/python -m pip install -r configs/requirements-dvc.txt; } > $(LOG).dvc 2>&1 & dvc=$$!; \
	  $(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install --upgrade pip && \
	  { $(PY) -c "import torch" 2>/dev/null || { set --; \
	    if $(PY) configs/index_answers.py "$(TORCH_CPU_INDEX)"; then set -- --extra-index-url "$(TORCH_CPU_INDEX)"; \
	    else echo "$(TORCH_CPU_INDEX) does not answer: torch 2.13.0 from the configured indexes"; fi; \
	    $(PY) -m pip install torch==2.13.0 "$$@"; }; } && \
	  $(PY) -m pip install -e ".[test]" && \
	  { wait $$dvc || { cat $(LOG).dvc; rm -f $(LOG).dvc; false; }; } && \
	  cat $(LOG).dvc && rm -f $(LOG).dvc && \
	  ln -sf "$(abspath $(DVC_VENV))/bin/dvc" $(VENV)/bin/dvc; \
	} > $(LOG) 2>&1 || { echo "install failed; the last lines of $(LOG):" >&2; tail -n 30 $(LOG) >&2; exit 1; }
	@grep -h "does not answer" $(LOG) >&2 || true
	@touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m rm_lib run

# The browser test of the Dagster UI drives Debian's Chromium (Playwright's own browsers are not
# used). Installed when missing, where apt-get may run (root or password-less sudo); elsewhere that
# test skips with its reason.
chromium:
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium for the browser test; output in $(LOG)"; \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive sh -c \
	    'apt-get update -qq && apt-get install -y -qq chromium chromium-driver' >> $(LOG) 2>&1 \
	  || echo "chromium not installed: the browser test will skip" >&2; }

# The fast tier: unit tests, a few minutes. The integration tier (marked `integration`: whole
# pipelines, DVC repositories, Dagster runs, the browser, real data) runs in CI as well. Both run on
# two pytest-xdist workers. --dist loadscope keeps a module's tests on one worker, in order, so a
# module-scoped project (a DVC repository, a materialized pipeline) is built once and its tests see
# each other's steps (xdist_group marks with --dist loadgroup did not keep them together here);
# --no-loadscope-reorder hands modules out longest first, as tests/conftest.py orders them.
test: install
	$(PY) -m pytest -q -m "not integration" -n 2 --dist loadscope --no-loadscope-reorder

test-integration: install chromium
	$(PY) -m pytest -q -m integration -n 2 --dist loadscope --no-loadscope-reorder

test-all: install chromium
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# each promised rule broken on purpose in a copy of the project: the tests that guard it must fail
mutants: install
	$(PY) tests/mutants.py

bench: install
	$(PY) -m pip install -q -e ".[bench]" >> $(LOG) 2>&1
	$(PY) benchmarks/bench_tokenize.py
	$(PY) benchmarks/bench_train.py --max-train-pairs 400 --max-test-pairs 400

ui: install
	mkdir -p .dagster_home
	cp orchestration/dagster.yaml .dagster_home/dagster.yaml
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(VENV)/bin/dagster dev -m orchestration.definitions -h 127.0.0.1 -p 3000

# `dvc exp show` without one column per code folder and data file: settings and metrics only.
EXP_SHOW := exp show --drop '^(rm_lib|data|models)/'
exp: install
	$(VENV)/bin/dvc $(EXP_SHOW)

clean:  # the outputs; data/sources (your own files) and the git-versioned metrics baseline stay
	find data -mindepth 1 -maxdepth 1 ! -name sources -exec rm -rf {} +
	git checkout -- data/evaluation/metrics.json 2>/dev/null || true
	rm -rf models wandb
