# Two commands do all the setup on a fresh machine:
#   make serve   install into .venv and start the server (demo profile unless models are configured)
#   make test    install into .venv, lint, type-check and run the whole test suite
# Every install goes through the lock, requirements/constraints.txt; `make lock` refreshes it from pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/constraints.txt
comma := ,

# The torch release CI tests and the torchvision built for it (they are released in pairs). `make lock` writes them
# into the lock, and every install (this Makefile's, the Dockerfile's) takes the versions from there.
TORCH_PINS := torch==2.13.0 torchvision==0.28.0

# Which build of it. PyPI's Linux x86-64 torch is the CUDA build (several GB), so a host without an NVIDIA GPU takes
# PyTorch's CPU wheel index, or pip's configured index when that index cannot be reached within 5 s (an offline
# mirror; a local CPU wheel). A GPU host (nvidia-smi on the PATH) takes pip's configured index, whose Linux torch is
# the CUDA build, plus torchvision (JPEG decoding on the GPU). TORCH_INDEX=URL names the index instead, e.g.
# https://download.pytorch.org/whl/cu126 for a driver older than PyPI's CUDA build needs; TORCH_INDEX= (empty)
# keeps pip's configuration. Only torch and torchvision come from that index: their dependencies come with the
# project's, through the lock.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
NVIDIA_GPU ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
reachable = $(shell $(PYTHON) -c 'import signal, sys, urllib.request; signal.alarm(6); urllib.request.urlopen(sys.argv[1], timeout=5)' \
	'$(1)' >/dev/null 2>&1 && echo yes || echo "note: $(1) cannot be reached; torch comes from pip's configured index" >&2)
TORCH_INDEX ?= $(if $(NVIDIA_GPU),,$(if $(call reachable,$(TORCH_CPU_INDEX)/torch/),$(TORCH_CPU_INDEX)))
TORCH_SPEC ?= torch $(if $(NVIDIA_GPU),torchvision) $(patsubst %,--index-url %,$(TORCH_INDEX))
EXTRAS := dev$(if $(NVIDIA_GPU),$(comma)gpu)

# The wheels whose generated API models tests/deploy/test_kserve.py checks deploy/kserve/inferenceservice.yaml
# against: KServe's Python SDK (its InferenceService models) and the Kubernetes client (the core types they use:
# V1Container, V1ObjectMeta, ...). Downloaded, never installed: the test reads their model sources from the zip, and
# their requirements conflict with the project's, so they are pinned here and not in the lock. Bump them together
# with the KServe release the manifest targets; the stamp's name holds the pins, so a bump downloads afresh.
KSERVE_MODEL_WHEELS := kserve==0.21.0 kubernetes==37.0.2
KSERVE_MODELS := $(VENV)/schemas
empty :=
KSERVE_MODELS_STAMP := $(KSERVE_MODELS)/.downloaded-$(subst ==,-,$(subst $(empty) $(empty),-,$(KSERVE_MODEL_WHEELS)))

.PHONY: serve test lint install audit lock protos

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade -c $(LOCK) pip

$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet --no-deps -c $(LOCK) $(TORCH_SPEC)
	$(BIN)/pip install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

$(KSERVE_MODELS_STAMP): | $(BIN)/python
	rm -rf $(KSERVE_MODELS)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: -c $(LOCK) $(KSERVE_MODEL_WHEELS) -d $(KSERVE_MODELS)
	touch $@

# KServe's Python SDK in an environment of its own, for tests/app/test_kserve_sdk.py (its requirements conflict with
# the project's lock, and it registers the protocol's protobuf names as tritonclient does, so it runs apart).
KSERVE_SDK := $(VENV)/kserve-sdk
KSERVE_SDK_STAMP := $(KSERVE_SDK)/.installed-$(subst ==,-,$(word 1,$(KSERVE_MODEL_WHEELS)))

$(KSERVE_SDK_STAMP): | $(BIN)/python
	rm -rf $(KSERVE_SDK)
	$(PYTHON) -m venv $(KSERVE_SDK)
	$(KSERVE_SDK)/bin/pip install --quiet $(word 1,$(KSERVE_MODEL_WHEELS))
	touch $@

install: $(VENV)/.installed $(KSERVE_MODELS_STAMP) $(KSERVE_SDK_STAMP)

serve: install
	$(BIN)/perceiver-serve $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy perceiver_core app client/perceiver_client

# Known vulnerabilities in the installed dependencies, reported to the log (CI does not fail on them:
# docs/reliability.md lists each advisory the project cannot fix, and why).
audit: install
	-$(BIN)/pip-audit --progress-spinner off --skip-editable

test: lint $(KSERVE_MODELS_STAMP) $(KSERVE_SDK_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Refreshes the lock after a dependency changes in pyproject.toml (tests/test_install.py fails until it is run).
# uv rather than pip-compile: it resolves one lock for every platform (--universal), and it reads no pip
# configuration, so a machine's own torch build (a +cpu wheel on a find-links path) cannot leak into the lock. It
# resolves from PyPI (UV_INDEX_URL names a mirror).
lock: | $(BIN)/python
	$(BIN)/pip install --quiet -c $(LOCK) uv
	printf '%s\n' $(TORCH_PINS) | $(BIN)/uv pip compile --quiet pyproject.toml - --all-extras --universal \
		--excludes requirements/cuda-only.txt --custom-compile-command "make lock" --output-file $(LOCK)

# The gRPC API's messages (app/oip/protos/*_pb2.py, committed) from the protocol's .proto and Triton's extensions;
# run after changing a .proto. They go into the package's own descriptor pool (app/oip/protos/__init__.py says why).
PROTOS := app/oip/protos/open_inference_grpc.proto app/oip/protos/triton_extensions.proto
protos: install
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. $(PROTOS)
	sed -i -e 's/^from google.protobuf import descriptor_pool as _descriptor_pool$$/from app.oip.protos import POOL/' \
		-e 's/_descriptor_pool.Default()/POOL/' $(PROTOS:.proto=_pb2.py)
