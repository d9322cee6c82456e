# abaw-nb: the two commands a user needs are `make reproduce` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
BIN     := $(VENV)/bin
LOCK    := requirements.lock
STAMP   := $(VENV)/.abaw-env
# uv is run as a module of the system python3, so installing it needs nothing but pip
UV      := python3 -m uv
PRESET  ?= cpu
PM_OPTS ?= -k python3 -l python --no-progress-bar

.PHONY: help env test test-real-path test-browser reproduce lab bench gpu-check lock readme clean-env

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/:/' | column -t -s:

# The environment is (re)built when missing or when the lock, setup.py, settings.ini or ENV_RECIPE changed:
# the stamp records a hash of those. The packages are compiled to bytecode at install time: where
# PYTHONDONTWRITEBYTECODE=1 is set (this machine, many containers) Python never writes .pyc files itself, and every
# process compiled torch, torchvision and sympy from source again (importing abaw_nb took 10.6 s, 4 s with bytecode).
ENV_RECIPE := compile-bytecode
ENV_HASH = $(shell { cat $(LOCK) setup.py settings.ini; echo $(ENV_RECIPE); } | sha256sum | cut -c1-16)

env:  ## create .venv from the lock (installs uv first if absent)
	@if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" = "$(ENV_HASH)" ] && [ -x $(PY) ]; then \
	  echo "env: $(VENV) is up to date with $(LOCK)"; \
	else \
	  python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv; \
	  echo "env: building $(VENV) from $(LOCK)"; \
	  [ -x $(PY) ] || $(UV) venv -q --python 3.11 $(VENV); \
	  $(UV) pip sync -q --compile-bytecode --python $(PY) $(LOCK); \
	  $(UV) pip install -q --python $(PY) --no-deps -e .; \
	  $(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (abaw-nb)" >/dev/null; \
	  echo "$(ENV_HASH)" > $(STAMP); \
	fi

# Each test stage runs under a time limit. Past it, every Python process of the stage prints its stack (faulthandler,
# on the SIGABRT that `timeout` sends to the whole process group) and the stage fails: a hang then says where it hangs
# instead of running into CI's limit. Distributed tests wait 120 s, not 600, for a rank that does not come.
TEST_ENV     := PYTHONFAULTHANDLER=1 ABAW_NB_DIST_TIMEOUT=120
# nbdev_test runs 2 notebooks at once and pytest 2 test files at once (pytest-xdist, one file per worker, so a module's
# fixture is built once): one compute thread each (torch's OpenMP and OpenBLAS), not two fighting for a core
# (OpenBLAS's spinning threads made a small logistic regression 4x slower that way). TEST_WORKERS=0: pytest in one
# process.
ONE_THREAD   := OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
TEST_WORKERS ?= 2
NBTEST_LIMIT ?= 35m
PYTEST_LIMIT ?= 40m

test: env  ## ruff on notebooks, scripts and tests, nbdev_test on every notebook, then pytest (each stage time-limited)
	$(BIN)/ruff check
	@mkdir -p .test-logs
	$(TEST_ENV) $(ONE_THREAD) timeout -s ABRT -k 60 $(NBTEST_LIMIT) $(BIN)/nbdev_test --n_workers 2 --timing --do_print 2>&1 \
	  | tee .test-logs/nbdev_test.log || { python3 scripts/unfinished_notebooks.py .test-logs/nbdev_test.log; exit 1; }
	$(TEST_ENV) $(ONE_THREAD) timeout -s ABRT -k 60 $(PYTEST_LIMIT) $(BIN)/pytest -q -m "not browser" --durations=25 \
	  -n $(TEST_WORKERS) --dist loadfile

test-real-path: env  ## the real-data path on CPU: make reproduce PRESET=smoke RESOURCES= with stand-in weights and SynthAffect in the released layouts (also part of make test)
	$(TEST_ENV) $(BIN)/pytest -q tests/test_real_path.py

test-browser: env  ## run nbs/explore.ipynb in JupyterLab + headless Chromium (installs Debian's chromium; screenshot in outputs/figures)
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
	$(BIN)/pytest -q -m browser tests/test_browser.py

reproduce: env  ## regenerate every table and figure under outputs/ (PRESET=smoke|cpu|paper, RESOURCES=resources.yml: your datasets and weights, JOBS=n notebooks at once, SEEDS=n seeds per seeded notebook, ONLY="20 31" some notebooks, OUT=another folder)
	$(BIN)/abaw-reproduce --preset $(PRESET) $(if $(RESOURCES),--resources "$(RESOURCES)") $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)") $(if $(JOBS),--jobs $(JOBS)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(ONLY),--only $(ONLY)) $(if $(OUT),--out "$(OUT)")

lab: env  ## JupyterLab from the venv
	$(BIN)/jupyter lab --notebook-dir=nbs

bench: env  ## benchmarks into outputs/bench (BENCH.md; FOOTAGE.md: abaw-predict fps per method; RECIPES.md: originals' steps vs the engine)
	$(BIN)/abaw-bench
	$(PY) -m abaw_nb.footage_bench
	$(PY) -m abaw_nb.recipe_bench

gpu-check: env  ## measure one GPU in at most 8 minutes into outputs/gpu/GPU.md + csv (DRY=1 for the CPU dry run, into outputs/gpu-dry-run)
	$(PY) -m abaw_nb.gpucheck $(if $(DRY),--dry-run)

lock:  ## recompile requirements.lock from requirements.in and regenerate environment.yml
	$(UV) pip compile -q requirements.in -o $(LOCK) --python-version 3.11
	python3 scripts/make_environment_yml.py

readme:  ## regenerate README.md from nbs/index.ipynb
	python3 scripts/make_readme.py

clean-env:  ## remove .venv
	rm -rf $(VENV)
