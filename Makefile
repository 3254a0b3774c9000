# concept_kernels developer targets. Every target creates .venv (pinned CPU stack) when missing.
#   make test        CPU test suite (Triton kernels under TRITON_INTERPRET=1, no network)
#   make demo        fine-tuning demo (vanilla, Bi-Tuning, Concept-Tuning over 3 seeds, few-shot digits)
#   make accuracy    every method over seeds, shot counts, two offline tasks -> bench/ACCURACY.md
#   make transferability  KITE ranking of EfficientNet-Lite0/1/2 vs their fine-tuning accuracy -> bench/TRANSFERABILITY.md
#   make ops-demo    the fused ops at realistic shapes   make bench  benchmarks -> bench/RESULTS.md
#   make build       (re)build concept_kernels._C when csrc/ or setup.py changed
#   make info        versions, built backends   make cuda-check  nvcc compile-check of csrc/**/*.cu
#   make cpp-check   csrc/**/*.cpp with g++-12/-11, clang++ >= 14 (x86-64-v3/v4) and aarch64 g++
#                    (installs missing compilers with apt-get; CI runs it)
#   make clean       build outputs (keeps .venv) make distclean   also .venv
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
export PIP_NO_CACHE_DIR := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# 2 xdist workers: on the 2-core machine the suite (153 tests) took 48 s instead of 81 s serially;
# override with `make test PYTEST_ARGS=` (serial) or e.g. PYTEST_ARGS="-n 2 -k ot_similarity"
PYTEST_ARGS ?= -n 2

# the second built-in task's data (animal silhouettes); --no-deps: the package's own loader imports
# tensorflow, we read its data files only (concept_kernels/train/data.py)
ANIMALS_PKG := animal-mnist==0.4
VENV_STAMP  := $(VENV)/.installed
BUILD_STAMP := $(VENV)/.built
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)
# rebuild when the extension is missing (e.g. after `make clean`), unless it is deliberately off
EXT_MISSING := $(if $(filter-out 0,$(CONCEPT_KERNELS_NO_EXT))$(wildcard concept_kernels/_C*.so),,FORCE)

.PHONY: venv build test demo accuracy transferability ops-demo bench info cuda-check cpp-check clean distclean FORCE
.DEFAULT_GOAL := test

# one pip command: torch is pinned next to timm, so pip keeps the CPU torch build
venv: $(VENV_STAMP)
$(VENV_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-deps $(ANIMALS_PKG)
	touch $@

build: $(BUILD_STAMP)
$(BUILD_STAMP): $(VENV_STAMP) setup.py pyproject.toml $(CSRC) $(EXT_MISSING)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

test: $(BUILD_STAMP)
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(BUILD_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m concept_kernels.train.demo

# fine-tuning accuracy over seeds, shot counts, methods and two tasks -> bench/ACCURACY.md (resumable;
# hours on 2 cores for the default grid: ACCURACY_ARGS='--tasks digits --shots 10' for a part)
ACCURACY_ARGS ?=
accuracy: $(BUILD_STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/accuracy.py $(ACCURACY_ARGS)

# KITE (training-free) ranking of the backbones with offline weights vs their vanilla fine-tuning accuracy,
# Spearman's rho -> bench/TRANSFERABILITY.md (resumable; TRANSFERABILITY_ARGS='--report-only' to re-render)
TRANSFERABILITY_ARGS ?=
transferability: $(BUILD_STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/transferability.py $(TRANSFERABILITY_ARGS)

ops-demo: $(BUILD_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m concept_kernels.demo

# which benchmarks `make bench` runs (default: all but the tiny smoke shapes), e.g.
#   make bench BENCH_ARGS='-k "ot_similarity and cpu"'
BENCH_ARGS ?= -k "not smoke"
bench: $(BUILD_STAMP)
	mkdir -p bench/results
	HF_HUB_OFFLINE=1 $(PY) -m pytest bench/ -q -p no:cacheprovider --benchmark-only --benchmark-json=bench/results/latest.json $(BENCH_ARGS)
	$(PY) bench/report.py bench/results/latest.json bench/RESULTS.md > bench/RESULTS.md.tmp
	mv bench/RESULTS.md.tmp bench/RESULTS.md

info: $(BUILD_STAMP)
	$(PY) -m concept_kernels.info

cuda-check: $(VENV_STAMP)
	csrc/tools/cuda_check.sh $(PY)

cpp-check: $(VENV_STAMP)
	csrc/tools/cpp_check.sh $(PY)

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks .ruff_cache $(BUILD_STAMP)
	rm -f concept_kernels/_C*.so concept_kernels/_build_info.py
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)

FORCE:
