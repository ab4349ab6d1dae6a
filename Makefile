# Vocos on Triton. `make serve` and `make test` are the two commands a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# Weights: hub ids or local folders, upstream (config.yaml + pytorch_model.bin) or transformers layout
# (config.json + model.safetensors; see docs/weights.md), and the EnCodec checkpoint file.
VOCOS_MEL ?= charactr/vocos-mel-24khz
VOCOS_ENCODEC ?= charactr/vocos-encodec-24khz
ENCODEC_CHECKPOINT ?=
# More Vocos checkpoints served beside the default ones, any geometry: VARIANTS="NAME=SOURCE ...", each adding
# models named <model>__NAME (docs/weights.md), e.g. VARIANTS="matcha-22k=/models/vocos-22khz".
VARIANTS ?=
# RANDOM_WEIGHTS=1: a loudly labelled demo with random-initialised weights (noise, not speech).
RANDOM_WEIGHTS ?= 0
# PRECISION=int8: opt-in int8 vocoders (CPU; faster, slightly lossy: docs/performance.md). fp32 is exact.
# PRECISION=fp16: opt-in fp16 backbone for PROFILE=gpu (head and ISTFT fp32; SNR-gated, see docs/hardware.md).
PRECISION ?= fp32
REPOSITORY ?= model_repository
HOST ?= 127.0.0.1
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002
PROFILE ?= cpu
# Exposure (docs/exposure.md): the admin key file (created, mode 0600, when absent; default
# build/triton/admin.key), an optional API key file for inference, gRPC TLS (TLS_CA: mutual TLS).
ADMIN_KEY_FILE ?=
API_KEY_FILE ?=
TLS_CERT ?=
TLS_KEY ?=
TLS_CA ?=
PYTEST_ARGS ?=
LOAD_USERS ?= 8
LOAD_SPAWN_RATE ?= 2
LOAD_DURATION ?= 60s
# entry models with optional weights, see load_tests/README.md (default: all of them, equal weights)
LOAD_PATHS ?=
LOAD_ARGS ?=

INSTALLED := $(VENV)/.installed

# The serving runtime: the environment the Python-backend stubs embed. It needs only torch (to load
# TorchScript), and a CPU-only torch costs each of the five stubs much less memory than the pinned
# CUDA build (see docs/deployment.md). On this machine kind `torch==2.13.0` is a CPU-only
# build on disk; elsewhere ask for one, e.g. RUNTIME_TORCH='torch==2.13.0+cpu'
# RUNTIME_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'. PROFILE=gpu serves from
# $(VENV) (CUDA torch) instead.
RUNTIME_VENV ?= .venv-runtime
RUNTIME_TORCH ?= torch==2.13.0
RUNTIME_PIP_ARGS ?=
ifeq ($(PROFILE),gpu)
RUNTIME_PYTHON := $(abspath $(PY))
RUNTIME_TARGET := $(INSTALLED)
else
RUNTIME_PYTHON := $(abspath $(RUNTIME_VENV))/bin/python
RUNTIME_TARGET := $(RUNTIME_VENV)/.installed
endif
# read by vocos_triton.launcher.server (and so by the tests, the bench and the load test)
export VOCOS_RUNTIME_PYTHON := $(RUNTIME_PYTHON)

.PHONY: install runtime system-deps repository serve test lint check-contract profiles load-test cluster-test bench bench-stream gpu-check overload guard-overhead clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[server,client,load,dev]'
	touch $@

runtime: $(RUNTIME_TARGET)

$(RUNTIME_VENV)/.installed: pyproject.toml
	test -x $(RUNTIME_VENV)/bin/python || $(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install --quiet --upgrade pip
	$(RUNTIME_VENV)/bin/pip install --quiet $(RUNTIME_PIP_ARGS) '$(RUNTIME_TORCH)' -e '.[runtime]'
	touch $@

# espeak-ng makes the speech the tests, benchmarks and load tests use; sox for inspecting audio;
# nginx proxies gRPC to the replicas of the cluster test (run as a plain process, never as a service).
system-deps:
	@if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null || ! { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null; then \
	  echo "installing espeak-ng, sox and nginx (Debian packages)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng sox nginx >/dev/null; \
	fi

ifeq ($(RANDOM_WEIGHTS),1)
WEIGHT_ARGS := --random-weights build/random-weights
else
WEIGHT_ARGS := --mel '$(VOCOS_MEL)' --encodec '$(VOCOS_ENCODEC)' $(if $(ENCODEC_CHECKPOINT),--encodec-checkpoint '$(ENCODEC_CHECKPOINT)')
endif

repository: install
	$(PY) -m vocos_triton.build.export --output $(REPOSITORY) --precision $(PRECISION) $(WEIGHT_ARGS) \
	  $(foreach v,$(VARIANTS),--variant '$(v)')

serve: repository runtime
	$(PY) -m vocos_triton.launcher.server --model-repository $(REPOSITORY) --host $(HOST) \
	  --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT) --profile $(PROFILE) \
	  $(if $(ADMIN_KEY_FILE),--admin-key-file '$(ADMIN_KEY_FILE)') $(if $(API_KEY_FILE),--api-key-file '$(API_KEY_FILE)') \
	  $(if $(TLS_CERT),--tls-cert '$(TLS_CERT)') $(if $(TLS_KEY),--tls-key '$(TLS_KEY)') $(if $(TLS_CA),--tls-ca '$(TLS_CA)')

lint: install
	$(VENV)/bin/ruff check .

test: install runtime system-deps lint
	$(PY) -m vocos_triton.launcher.profiles --check
	$(PY) -m pytest $(PYTEST_ARGS)

profiles: install
	$(PY) -m vocos_triton.launcher.profiles

check-contract: install
	$(PY) ../shared/tools/check_contract.py $(REPOSITORY)

# Locust, headless, against a tritonserver it starts on free ports; CSV + HTML + summary in results/<stamp>/.
load-test: install runtime system-deps
	@ls $(REPOSITORY)/*/1/model.pt >/dev/null 2>&1 || $(MAKE) repository
	$(PY) load_tests/run_load_test.py --repository $(REPOSITORY) --profile $(PROFILE) \
	  --users $(LOAD_USERS) --spawn-rate $(LOAD_SPAWN_RATE) --duration $(LOAD_DURATION) \
	  $(if $(LOAD_PATHS),--paths $(LOAD_PATHS)) --results-dir results $(LOAD_ARGS)

# Three replicas on loopback, Locust through nginx and then client-side round_robin, one replica
# SIGKILLed 20 s into each 60 s run; fails on any failed request (see load_tests/cluster_test.py).
cluster-test: install runtime system-deps
	@ls $(REPOSITORY)/*/1/model.pt >/dev/null 2>&1 || $(MAKE) repository
	$(PY) load_tests/cluster_test.py --repository $(REPOSITORY) --results-dir results

# Side-by-side benchmark (reference eager vs TorchScript in-process vs Triton) on the repository's weights.
bench: install runtime system-deps
	@ls $(REPOSITORY)/*/1/model.pt >/dev/null 2>&1 || $(MAKE) repository
	$(PY) load_tests/bench.py --repository $(REPOSITORY) --out results/bench --int8 --stream

# Only the streaming table of the benchmark (time to first audio, RTF by concurrency, issue-13 ratios).
bench-stream: install runtime system-deps
	@ls $(REPOSITORY)/*/1/model.pt >/dev/null 2>&1 || $(MAKE) repository
	$(PY) load_tests/bench.py --repository $(REPOSITORY) --out results/bench --only-stream

# The GPU profile end to end on an NVIDIA GPU (< 8 min): build, serve PROFILE=gpu, check every path against the
# reference on the GPU, bench concurrency 1-64; results/gpu-check/gpu_check.{json,png}. Exits 2 without a GPU.
# Real weights: GPU_CHECK_ARGS="--mel DIR --encodec DIR --encodec-checkpoint FILE" (default: random weights).
gpu-check: install system-deps
	$(PY) load_tests/gpu_check.py --out results/gpu-check $(GPU_CHECK_ARGS)

# Shedding under overload: idle PSS, capacity at 1x, open-loop 3x for OVERLOAD_SECONDS with 2 s deadlines,
# ten bursts of 200 x 60 s requests with 5 s deadlines from plain tritonclient (tritonserver restarts,
# recovery, PSS), a stub killed under load (failed calls, p99), stop under load; server and load
# generator pinned to separate CPUs.
OVERLOAD_SECONDS ?= 60
OVERLOAD_ARGS ?=
overload: install runtime system-deps
	@ls $(REPOSITORY)/*/1/model.pt >/dev/null 2>&1 || $(MAKE) repository
	$(PY) load_tests/overload.py --repository $(REPOSITORY) --profile $(PROFILE) --seconds $(OVERLOAD_SECONDS) \
	  --out results/overload $(OVERLOAD_ARGS)

# What the gRPC guard costs: the same calls through it and straight to tritonserver, side by side.
guard-overhead: install runtime system-deps
	@ls $(REPOSITORY)/*/1/model.pt >/dev/null 2>&1 || $(MAKE) repository
	$(PY) load_tests/guard_overhead.py --repository $(REPOSITORY) --out results/guard

clean:
	rm -rf build results $(REPOSITORY)/*/1/model.pt $(REPOSITORY)/*/1/codebooks.npy $(REPOSITORY)/*/1/melbank.npz $(REPOSITORY)/*/1/provenance.json
