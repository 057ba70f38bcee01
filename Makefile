# Vitrine: the README's commands. Every target sets up .venv first (uv, from nothing).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(PYTHON) -m uv
export DVC_NO_ANALYTICS := 1

.PHONY: setup demo test test-fast lint format bench grocery-losses clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) venv --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(BIN)/python -e '.[dev]'
	@touch $@

## The main job on embedded defaults (demo catalogue -> fine-tune -> evaluate, CPU).
demo: setup
	$(BIN)/vitrine demo

## Lint, format check and the whole test suite (slow tests included, GPU tests excluded).
test: setup lint
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

## The README's loss table on the shared Grocery photos (about an hour on 2 CPU cores).
grocery-losses: setup
	scripts/grocery_losses.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache artifacts
