# edgedance: `make demo` runs the main job, `make test` the tests; both set up first.
PY := .venv/bin/python
EDGEDANCE_DATA ?=
SOURCE ?= file
export EDGEDANCE_DATA

.PHONY: setup test test-fast bench demo clean

setup:
	@./scripts/setup.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not realdata"

bench: setup
	$(PY) -m bench.run

demo: setup
	$(PY) -m device demo --source $(SOURCE)

clean:
	rm -rf .venv build *.egg-info .pytest_cache
