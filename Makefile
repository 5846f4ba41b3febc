# fsweep: `make setup`, `make demo`, `make test` (`make bench`: the benchmarks, ~9 min on 2 cores).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=
# pytest-xdist workers, each running whole test modules (0: one process, no xdist)
TEST_WORKERS ?= 2

BUNDLE ?= bench/gpu-bundle
BUNDLE_PY ?= 3.12
NODE_VENV ?= /tmp/fsweep-node-venv

.PHONY: setup demo test test-fast bench clean gpu-bundle gpu-node-dry

# --no-compile: Python compiles each module on its first import instead of every file of every package at
# install (torch's tests, Ray's dashboard...): the install takes a third less, and nothing is lost, provided
# those first imports may write their cache, hence the unexport.
unexport PYTHONDONTWRITEBYTECODE

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, from the wheels on disk: a bare `torch` requirement would pull a newer CUDA build
	$(PIP) install -q --no-compile torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-compile -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fsweep demo --out $(DEMO_OUT)

# --dist loadfile: a module's fixtures (a trained detector, a sweep, a Ray cluster) are built once, on one worker;
# --no-loadscope-reorder keeps conftest's longest-first module order (xdist would sort by test count)
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/store.py
	$(PY) bench/asha.py
	$(PY) bench/scaling.py
	$(PY) bench/train_throughput.py --size 64 --batch 4
	$(PY) bench/gpu.py

# The wheels a bare GPU node (Python 3.12, CUDA torch, no network) lacks, for bench/gpu_node.sh:
# `make gpu-bundle` (BUNDLE_PY=3.11 for this machine's dry run). Needs PyPI; out of git.
gpu-bundle: setup
	$(PY) bench/gpu_bundle.py --python $(BUNDLE_PY) --out $(BUNDLE)

# bench/gpu_node.sh --cpu in a fresh virtual environment made like the node (torch from disk, the node's
# packages), installing the rest from the py3.11 bundle only.
gpu-node-dry:
	test -f $(BUNDLE)/fsweep-gpu-bundle-py311.tar.xz || $(MAKE) gpu-bundle BUNDLE_PY=3.11
	rm -rf $(NODE_VENV) && $(PYTHON) -m venv $(NODE_VENV)
	$(NODE_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(NODE_VENV)/bin/pip install -q timm tensorboard onnx onnxruntime opencv-python pandas pyarrow
	PYTHON=$(NODE_VENV)/bin/python bash bench/gpu_node.sh --cpu --out $(NODE_VENV)-out

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
