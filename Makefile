# Two commands do all the setup on a fresh machine:
#   make serve   install into .venv and start the server (demo profile unless models are configured)
#   make test    install into .venv, lint, type-check and run the whole test suite
# TORCH_SPEC picks the torch build: the default is the CPU wheel. GPU hosts name the CUDA build with the
# torchvision built for it (JPEG decoding on the GPU), from PyTorch's index (see README).

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint install audit

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/perceiver-serve $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy perceiver_core app

# Known vulnerabilities in the installed dependencies, reported to the log (CI does not fail on them:
# docs/reliability.md lists each advisory the project cannot fix, and why).
audit: install
	-$(BIN)/pip-audit --progress-spinner off --skip-editable

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)
