# Vitrine: the README's commands. Every target sets up .venv first (uv, from nothing).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(PYTHON) -m uv
export DVC_NO_ANALYTICS := 1
# Keep bytecode caches: the suite starts many Python processes that import torch, timm and
# Great Expectations, and recompiling them from source costs seconds each time.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup system-deps demo repro serve test test-fast lint format bench grocery-losses clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) venv --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(BIN)/python -e '.[dev,workflow]'
	@touch $@

## Debian packages the browser test (chromium, chromium-driver) and the monitoring tests
## (prometheus, promtool, prometheus-pushgateway) use. Installed with apt-get when missing and
## run as root; elsewhere their tests skip and say why. jemalloc (libjemalloc2), which the
## `vitrine` script preloads where present (components/runtime.py), is optional: if it cannot be
## installed, glibc's malloc serves.
SYSTEM_PACKAGES := chromium chromium-driver prometheus prometheus-pushgateway
system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	    && command -v promtool >/dev/null && command -v prometheus-pushgateway >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $(SYSTEM_PACKAGES) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	        --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "note: $(SYSTEM_PACKAGES) missing and apt-get unavailable: their tests will skip"; fi
	@if /sbin/ldconfig -p 2>/dev/null | grep -q 'libjemalloc\.so\.2'; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing libjemalloc2 with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        libjemalloc2 >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 \
	        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        libjemalloc2 >/dev/null 2>&1; } || echo "note: libjemalloc2 not installed: glibc's malloc serves"; \
	else echo "note: libjemalloc2 missing and apt-get unavailable: glibc's malloc serves"; fi

## The main job on embedded defaults (demo catalogue -> fine-tune -> evaluate, CPU).
demo: setup
	$(BIN)/vitrine demo

## The DVC pipeline (dvc.yaml): catalog -> validate -> train -> evaluate -> index.
repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

## The search service and its page on http://127.0.0.1:8000 (after `make demo` built an index).
serve: setup
	$(BIN)/vitrine serve

## Lint, format check and the whole test suite (slow tests included, GPU tests excluded).
test: setup system-deps lint
	$(BIN)/pytest

## The fast subset: no real-data or long training tests.
test-fast: setup
	$(BIN)/pytest -m "not slow and not gpu"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Speed benchmarks (each prints a ratio against a baseline measured in the same run).
bench: setup
	$(BIN)/python bench/bench_train_throughput.py
	$(BIN)/python bench/bench_recall.py
	$(BIN)/python bench/bench_allocator.py
	$(BIN)/python bench/bench_validate.py
	$(BIN)/python bench/bench_index.py
	$(BIN)/python bench/bench_service.py

## The README's loss table on the shared Grocery photos (about an hour on 2 CPU cores).
grocery-losses: setup
	scripts/grocery_losses.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache artifacts
