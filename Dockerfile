# syntax=docker/dockerfile:1.7@sha256:a57df69d0ea827fb7266491f2813635de6f17269be881f696fbfdf2d83dda33e
#
# The bpo images. One image runs every process of the platform (`bpo serve jobs|rewriter|generator|judge`,
# `bpo worker`, `python -m training`, `bpo models prepare`); the Kubernetes manifests under k8s/ choose which.
#
#   docker build --target cpu -t <registry>/bpo:0.1.0-cpu .    llama.cpp (portable x86-64 build), PyTorch CPU,
#                                                              the packaged GGUF models; the default target
#   docker build --target gpu -t <registry>/bpo:0.1.0-cuda .   vLLM and PyTorch with CUDA for NVIDIA GPUs
#
# Both run as the unprivileged user bpo (10001:10001), work with a read-only root filesystem (writable paths:
# BPO_STATE_DIR=/var/lib/bpo/state, /tmp and /home/bpo, mounted as volumes by the manifests), bind 0.0.0.0 and
# carry `grpc-health-probe` (k8s/image/) for exec probes and `docker exec`: the manifests' start-up and liveness
# probes (-alive: any answer, NOT_SERVING included) and, with gRPC TLS, every probe (-tls, client certificate).
# No configuration or secret is baked in: the manifests mount the endpoint declarations (BPO_ENDPOINTS_FILE),
# the endpoint keys (BPO_SECRETS_DIR) and the TLS files, and pass the database, Kafka and Redis from Secrets.
#
# Base images are pinned by digest; k8s/README.md ("Images") says where each digest came from and how to bump it.
# The CUDA image takes the CUDA runtime from the PyTorch/vLLM wheels (nvidia-* packages) and the driver from the
# node (NVIDIA container toolkit), so it shares the pinned Python base instead of an nvidia/cuda one.
#
# Lint: hadolint Dockerfile. Debian packages are not pinned one by one: the base image digest fixes the Debian
# release, whose packages only receive security fixes (DL3008). Unquoted $(...) below split lists on purpose
# (SC2046, SC2086): pip arguments that the Makefile holds as space-separated lists.
# hadolint global ignore=DL3008,SC2046,SC2086

ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
# vLLM 0.32.0 pins torch 2.13.0, the version pyproject's cpu and train extras pin: one torch for both.
ARG VLLM_VERSION=0.32.0
ARG VENV=/opt/bpo/venv

# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build-base
ARG VENV
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake make \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src

# ---------------------------------------------------------------------------------------------------------------
FROM build-base AS build-cpu
ARG VENV
# The Makefile is the one place the build of llama-cpp-python is defined (version and the portable CMake flags:
# AVX2/FMA/F16C on, GGML_NATIVE, AVX-512 and AMX off, so the image runs on any x86-64 node, not just the build
# host), and the torch build and model packages too: its own targets and variables are used, never copies.
COPY Makefile ./
RUN set -eux; \
    mk() { make -s --no-print-directory VENV="${VENV}" --eval 'print-%: ; @echo $($*)' "print-$1" 2>/dev/null; }; \
    stamp="$(mk LLAMA_STAMP)"; torch="$(mk TORCH)"; index="$(mk TORCH_INDEX)"; models="$(mk MODEL_PACKAGES)"; \
    test -n "${stamp}" && test -n "${torch}" && test -n "${models}"; \
    make --no-print-directory VENV="${VENV}" "${stamp}"; \
    "${VENV}/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"; \
    "${VENV}/bin/python" -m pip install "${torch}" ${index}; \
    "${VENV}/bin/python" -m pip install --no-deps ${models}; \
    echo "${index}" > /src/.torch-index
COPY pyproject.toml README.md ./
COPY bpo ./bpo
COPY services ./services
COPY training ./training
# llama-cpp-python and torch are installed already at the pinned versions, so pip keeps them.
RUN "${VENV}/bin/python" -m pip install $(cat /src/.torch-index) ".[cpu,train]"

# ---------------------------------------------------------------------------------------------------------------
FROM build-base AS build-gpu
ARG VENV
ARG VLLM_VERSION
RUN python -m venv "${VENV}" \
    && "${VENV}/bin/python" -m pip install --upgrade pip wheel \
    && "${VENV}/bin/python" -m pip install "vllm==${VLLM_VERSION}"
COPY pyproject.toml README.md ./
COPY bpo ./bpo
COPY services ./services
COPY training ./training
RUN "${VENV}/bin/python" -m pip install ".[vllm,train]" "vllm==${VLLM_VERSION}"

# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-base
ARG VENV
# tini as PID 1: forwards SIGTERM (graceful gRPC drain; for workers, with REMAP_SIGTERM=SIGQUIT set by the
# manifests, Celery's soft then cold shutdown) and reaps Celery's children.
# libgomp1: llama.cpp's OpenMP runtime.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 bpo \
    && useradd --system --uid 10001 --gid bpo --home-dir /home/bpo --create-home --shell /usr/sbin/nologin bpo \
    && install -d -o bpo -g bpo /var/lib/bpo /var/lib/bpo/state /var/lib/bpo/optimizers
# gRPC health check (upstream grpc-health-probe's flags and exit codes, plus -alive) for exec probes and
# `docker exec`; a Python script run by the virtual environment's interpreter.
COPY --chmod=0755 k8s/image/grpc-health-probe /usr/local/bin/grpc-health-probe
ENV PATH="${VENV}/bin:${PATH}" \
    HOME=/home/bpo \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    BPO_STATE_DIR=/var/lib/bpo/state \
    BPO_PLATFORM__HOST=0.0.0.0 \
    BPO_PLATFORM__METRICS_HOST=0.0.0.0 \
    BPO_WORKER_METRICS_HOST=0.0.0.0
WORKDIR /home/bpo
# gRPC: jobs, optimizer (rewriter), generator, judge; Prometheus: the four services, then the worker.
EXPOSE 50051 50052 50053 50054 9400 9401 9402 9403 9404
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["bpo", "--help"]
LABEL org.opencontainers.image.title="bpo" \
      org.opencontainers.image.description="Black-Box Prompt Optimization platform" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"

# ---------------------------------------------------------------------------------------------------------------
FROM runtime-base AS gpu
ARG VENV
# Triton (under vLLM and PyTorch) compiles a small C launcher at run time: it needs a C compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-gpu ${VENV} ${VENV}
# The NVIDIA container toolkit mounts the driver's compute libraries only when asked to.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
LABEL org.opencontainers.image.description="Black-Box Prompt Optimization platform (vLLM, CUDA)"

# ---------------------------------------------------------------------------------------------------------------
FROM runtime-base AS cpu
ARG VENV
COPY --from=build-cpu ${VENV} ${VENV}
USER 10001:10001
LABEL org.opencontainers.image.description="Black-Box Prompt Optimization platform (llama.cpp, CPU)"
