# syntax=docker/dockerfile:1
# Perceiver IO serving image. CUDA runtime by default; `--build-arg VARIANT=cpu` for a CPU-only image.
#   docker build -t perceiver-serve:cuda .
#   docker build --build-arg VARIANT=cpu -t perceiver-serve:cpu .
#   docker build --build-arg COMPILER=true ...   adds a C compiler (PERCEIVER_COMPILE, the Triton kernels)
# Weights are never baked in: mount a checkpoint directory or a Hugging Face cache at /models.

ARG VARIANT=cuda

# Base images: the CUDA runtime (driver-compatible libraries only, no compiler) or plain Debian Python.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 AS base-cuda
# Ubuntu 24.04 ships Python 3.12; venv support is a separate package. Versions follow the pinned base tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu126

FROM python:3.12-slim-bookworm AS base-cpu
# The CPU wheel index keeps the image ~1.5 GB smaller than the default CUDA-bundling wheels.
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

# Builder: resolve and install every dependency into a self-contained virtualenv.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Every version comes from the lock that CI installs and tests (`make lock` writes it), torch's included.
COPY requirements/constraints.txt ./requirements/
# torch first, alone, from the variant's index, so the project install below reuses it instead of pulling PyPI's
# build; torchvision built for the same torch (the CUDA image decodes JPEG uploads on the GPU with it). Their
# dependencies (and the CUDA image's CUDA runtime wheels, which torch pins exactly) come from PyPI below.
RUN pip install --no-deps -c requirements/constraints.txt torch torchvision --index-url "${TORCH_INDEX}"
# Only what the package build needs, so edits to tests or docs don't invalidate this layer.
COPY pyproject.toml README.md ./
COPY perceiver_core ./perceiver_core
COPY app ./app
# tracing: OpenTelemetry, off unless PERCEIVER_TRACING or the OTEL_* variables turn it on (README, Settings).
RUN pip install -c requirements/constraints.txt ".[gpu,tracing]"

# Runtime: the same base, the virtualenv, and nothing else (no compilers unless COMPILER=true, no sources, no secrets).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
# PERCEIVER_COMPILE=latent and PERCEIVER_WIDE_ATTENTION=fused build kernels when the server starts, and need a C
# compiler for it (Inductor's CPU kernels, Triton's launcher) and Python's headers (the CPU image's Python has
# them; the CUDA image's is Ubuntu's, whose headers are python3-dev). Without them they log why and run eagerly.
ARG COMPILER=false
# hadolint ignore=DL3008
RUN if [ "${COMPILER}" = true ]; then \
        headers=python3-dev; [ -x /usr/local/bin/python3 ] && headers=; \
        apt-get update && apt-get install -y --no-install-recommends gcc g++ libc6-dev ${headers} \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=builder /opt/venv /opt/venv
# A fixed non-root uid so Kubernetes can enforce runAsNonRoot and volume ownership (fsGroup) predictably.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin perceiver \
    && mkdir -p /models && chown 10001:10001 /models
# HF_HOME points at the mounted volume; offline by default so a missing model fails fast instead of downloading.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models/hf \
    HF_HUB_OFFLINE=1 \
    PERCEIVER_HOST=0.0.0.0 \
    PERCEIVER_PORT=8000 \
    PERCEIVER_GRPC_PORT=8001
VOLUME ["/models"]
WORKDIR /tmp
USER 10001:10001
# HTTP (REST, /v2, /metrics) and the Open Inference Protocol's gRPC API (plaintext HTTP/2, Triton's and KServe's 8001).
EXPOSE 8000 8001
# Liveness only, over HTTP: /readyz (and gRPC health) is for the load balancer, which must wait for models to load and
# warm up. On PERCEIVER_PORT (docker run -e PERCEIVER_PORT=9000 moves both; a --port flag or a config file's port
# moves the server only).
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('PERCEIVER_PORT', '8000'); sys.exit(urllib.request.urlopen('http://127.0.0.1:' + port + '/healthz', timeout=2).status != 200)"]
# Exec form: the server is PID 1 and receives SIGTERM directly, which starts its drain.
ENTRYPOINT ["perceiver-serve"]
