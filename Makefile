# Two entry points, each does its own set-up on a fresh machine:
#   make demo   - the main job with built-in defaults (VGG16-CIFAR at 90 %: sparse vs dense)
#   make test   - the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fscnn-tvm compare

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

.PHONY: install demo test
