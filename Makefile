# fsweep: `make setup`, `make demo`, `make test` (`make bench`: the benchmarks, ~9 min on 2 cores).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the wheels on disk: a bare `torch` requirement would pull a newer CUDA build
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fsweep demo --out $(DEMO_OUT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/store.py
	$(PY) bench/asha.py
	$(PY) bench/scaling.py
	$(PY) bench/train_throughput.py --size 64 --batch 4
	$(PY) bench/gpu.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
