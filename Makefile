# The two set-up commands of the README, and the benchmarks. Each target installs what it needs.
PYTHON ?= python3
WORKDIR ?= workdirs/digits
PYTEST_ARGS ?=

.PHONY: install install-test demo test study bench-quantizer bench-train-step

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e ".[test]"

# Pretrain on the embedded digits (all phases), linear-probe every encoder, print the accuracies and the workdir.
demo: install
	$(PYTHON) -m bridle_jax.main --config=configs/digits.py --workdir=$(WORKDIR)

# The test suite on CPU with 8 fake devices (tests/conftest.py sets them).
test: install-test
	$(PYTHON) -m pytest tests -q $(PYTEST_ARGS)

# The real-data study (README "Does it learn?"): Fashion-MNIST (apt-get install dataset-fashion-mnist), ~90 min.
study: install-test
	$(PYTHON) benchmarks/study.py

# PEER_PYTHON: an interpreter with torch + vector-quantize-pytorch (see BENCHMARKS.md) to time the peer side by side.
bench-quantizer: install
	$(PYTHON) benchmarks/quantizer.py $(if $(PEER_PYTHON),--peer-python $(PEER_PYTHON)) --wait-quiet

bench-train-step: install
	$(PYTHON) benchmarks/train_step.py
