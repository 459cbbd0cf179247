# The two set-up commands of the README, and the benchmarks. Each target installs what it needs.
#
# PYTHON: the interpreter that installs and runs everything. Left unset, it is python3 itself when pip may install
# into it (a virtual environment, conda, pyenv, a container's own Python), and otherwise -- a system Python marked
# "externally managed" (PEP 668: Debian, Ubuntu) or one without pip -- the virtual environment $(VENV), created on
# first use from python3 (BASE_PYTHON). Once $(VENV) exists it is always used. `make test PYTHON=python3.12` forces
# an interpreter.
BASE_PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= workdirs/digits
PYTEST_ARGS ?=
# Test modules run in this many pytest-xdist workers, each module whole in one worker (its compiled fixtures are
# shared by its tests); 2 halves the suite's time on a 2-core machine, where XLA compiles mostly on one core.
TEST_WORKERS ?= 2

# Exit status 0: pip may install into this interpreter (in a venv, or not marked externally managed, or told to
# break system packages).
CAN_PIP = import importlib.util, os, sys, sysconfig; \
  managed = os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")); \
  ok = importlib.util.find_spec("pip") and (sys.prefix != sys.base_prefix or not managed \
    or os.environ.get("PIP_BREAK_SYSTEM_PACKAGES")); \
  sys.exit(0 if ok else 1)

ifeq ($(origin PYTHON), undefined)
  PYTHON := $(shell if [ -x "$(VENV)/bin/python" ]; then echo "$(VENV)/bin/python"; \
    elif $(BASE_PYTHON) -c '$(CAN_PIP)' >/dev/null 2>&1; then echo "$(BASE_PYTHON)"; \
    else echo "$(VENV)/bin/python"; fi)
endif
# The venv, when PYTHON is it and it is not there yet.
NEEDS_VENV := $(if $(filter $(VENV)/bin/python,$(PYTHON)),$(VENV)/bin/python)

.PHONY: install install-test demo test lint study bench-quantizer bench-train-step bench-accelerator bench-input

$(VENV)/bin/python:
	@echo "$(BASE_PYTHON) does not let pip install into it (PEP 668 'externally managed', or no pip): using a virtual environment in $(VENV)"
	$(BASE_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "could not create $(VENV): on Debian/Ubuntu run 'sudo apt-get install python3-venv' (or pass PYTHON=...)"; exit 1; }
	$(VENV)/bin/python -m pip install -q --upgrade pip

install: $(NEEDS_VENV)
	$(PYTHON) -m pip install -q -e .

install-test: $(NEEDS_VENV)
	$(PYTHON) -m pip install -q -e ".[test]"

# Pretrain on the embedded digits (all phases), linear-probe every encoder, print the accuracies and the workdir.
demo: install
	$(PYTHON) -m bridle_jax.main --config=configs/digits.py --workdir=$(WORKDIR)

# The test suite on CPU with 8 fake devices (tests/conftest.py sets them).
test: install-test
	$(PYTHON) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# ruff's lint and format checks with the repository's config (pyproject.toml); .ci/run runs them before the tests.
lint: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# The real-data study (README "Does it learn?"): Fashion-MNIST (apt-get install dataset-fashion-mnist), ~150 min (RQ, VQ and the joint variant).
study: install-test
	$(PYTHON) benchmarks/study.py

# PEER_PYTHON: an interpreter with torch + vector-quantize-pytorch (see BENCHMARKS.md) to time the peer side by side.
bench-quantizer: install
	$(PYTHON) benchmarks/quantizer.py $(if $(PEER_PYTHON),--peer-python $(PEER_PYTHON)) --wait-quiet

# PEER_PYTHON (torch + timm) and OFFICIAL (a checkout of github.com/HoangNguyenM/bridle): the authors' step beside ours.
bench-train-step: install
	$(PYTHON) benchmarks/train_step.py $(if $(PEER_PYTHON),--peer-python $(PEER_PYTHON) --official $(OFFICIAL))

# The train streams' samples/s per host core on generated JPEG/wav/mp4 files (BENCHMARKS.md "Input pipeline"), ~4 min
# on 2 cores: benchmarks/results/input_pipeline.json. PEER_PYTHON: an interpreter with torch + torchvision (the peer).
bench-input: install
	@mkdir -p benchmarks/results
	$(PYTHON) benchmarks/input_pipeline.py --out benchmarks/results/input_pipeline.json $(if $(PEER_PYTHON),--peer-python $(PEER_PYTHON))

# The recipes' ViT-B steps in bf16 on one GPU or TPU chip (BENCHMARKS.md "Accelerator benchmark"), <= 8 min:
# benchmarks/results/accelerator.json. ACCEL: the jax extra of the device (gpu: CUDA 12, tpu); unset, gpu where
# nvidia-smi runs, tpu where /dev/accel0 or /dev/vfio/0 exists (a TPU VM), else none (a CPU run: add
# BENCH_ACCELERATOR_ARGS=--toy, a smoke test and no measurement).
ACCEL ?= $(shell if nvidia-smi >/dev/null 2>&1; then echo gpu; elif [ -e /dev/accel0 ] || [ -e /dev/vfio/0 ]; then echo tpu; fi)
BENCH_ACCELERATOR_ARGS ?=
bench-accelerator: $(NEEDS_VENV)
	$(PYTHON) -m pip install -q -e ".$(if $(ACCEL),[$(ACCEL)])"
	@mkdir -p benchmarks/results
	$(PYTHON) benchmarks/accelerator.py --out benchmarks/results/accelerator.json $(BENCH_ACCELERATOR_ARGS)
