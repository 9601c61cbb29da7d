# unmask developer tasks. `make install` then `make demo` (main job) or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo

.PHONY: install test test-all lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e '.[dev]'

# pytest exit code 5 ("no tests collected") is turned into a failure: it must never pass silently.
test:
	$(BIN)/python -m pytest -m 'not slow'; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests"; [ $$rc -eq 0 ]

test-all:
	$(BIN)/python -m pytest; rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests"; [ $$rc -eq 0 ]

lint:
	$(BIN)/ruff check unmask_cli tests benchmarks

demo:
	$(BIN)/unmask prepare --out $(DEMO)/data --num-samples 256 --workers 2 --mask-types surgical,n95,kn95,cloth,rect,oval
	@echo "demo: prepared data in $(DEMO)/data"

bench:
	$(BIN)/python benchmarks/prepare.py

clean:
	rm -rf $(DEMO) .pytest_cache
