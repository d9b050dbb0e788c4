# fastformer developer tasks. `make help` lists them.

VENV ?= .venv
PYTHON ?= python3
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test bench info build-cuda clean

help:
	@echo "make install     create $(VENV) and install fastformer in it (editable, dev + bench extras)"
	@echo "make test        run the tests (extra pytest arguments: PYTEST_ARGS='-k attention -x')"
	@echo "make bench       run the attention benchmark"
	@echo "make info        show versions, devices and which backends can run here"
	@echo "make build-cuda  rebuild the CUDA extension fastformer._C in place (fails if it cannot)"
	@echo "make clean       remove build outputs (keeps $(VENV))"
	@echo "variables: VENV=$(VENV) PYTHON=$(PYTHON); build: FASTFORMER_BUILD_CUDA=0|1|auto,"
	@echo "           FASTFORMER_CUDA_ARCHS='8.0;9.0a', MAX_JOBS, NVCC_THREADS, FASTFORMER_BUILD_CACHE=DIR"

# torch and ninja come first: the editable install builds the CUDA extension against the torch
# already in the venv (--no-build-isolation), with ninja.
# csrc/ too: a changed kernel is rebuilt by the next `make test` (FASTFORMER_BUILD_CACHE, which
# .ci/run sets, makes an unchanged csrc/ cost a copy instead of a compilation).
$(STAMP): pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install torch ninja
	$(PY) -m pip install --no-build-isolation -e ".[dev,bench]"
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/attention.py

info: $(STAMP)
	$(PY) -m fastformer.info

build-cuda: $(STAMP)
	FASTFORMER_BUILD_CUDA=1 $(PY) setup.py build_ext --inplace

clean:
	rm -rf build/ *.egg-info .pytest_cache $(STAMP)
	rm -f fastformer/_C*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
