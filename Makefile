# ViT Serve — `make serve` serves the default model, `make test` runs every test.
# Both create .venv and install the pinned dependencies first if needed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 3000
PYTEST_ARGS ?=
USERS ?= 16
DURATION ?= 60
MAX_P95_MS ?= 5000
SHAPE ?= steady
URL ?=
FUZZ_SECONDS ?= 600
FUZZ_API_CASES ?= 20000
FUZZ_GRPC_CASES ?= 20000
MINUTES ?= 10
# KServe's SDK, for its API types only (requirements-kserve.txt says why it has a venv of its own).
KSERVE_SDK := kserve==0.21.0

.DEFAULT_GOAL := help
.PHONY: help install system serve test test-unit test-http test-integration test-e2e fuzz lint format \
        train import-model bench bench-oip triton-env overload storm loadtest soak rehearsal container-test clean \
        evaluate depth-study

# What the tests use beyond pip, from Debian: a real Prometheus (and promtool), compose
# validation, headless Chromium + ChromeDriver for the page, podman + runc + mmdebstrap to build
# and run the image, kubectl (kustomize) to render deploy/kubernetes, HAProxy for the cluster
# rehearsal, wrk and h2load (nghttp2-client) for the benchmarks, and Debian's python3.11 venv for the
# benchmark's Triton peer.
SYSTEM_PACKAGES := prometheus docker-compose chromium chromium-driver podman runc mmdebstrap \
                   kubectl haproxy wrk nghttp2-client python3.11-venv

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt constraints.txt requirements-checkov.txt \
          requirements-kserve.txt
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: install Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	test -x $(VENV)/checkov/bin/python || $(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet -r requirements-checkov.txt
	test -x $(VENV)/kserve/bin/python || $(PYTHON) -m venv $(VENV)/kserve
	$(VENV)/kserve/bin/pip install --quiet -r requirements-kserve.txt
	$(VENV)/kserve/bin/pip install --quiet --no-deps $(KSERVE_SDK)
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the pinned dependencies

system: ## Install the Debian packages the tests need (apt-get, as root or with sudo)
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
		| grep -q 'ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "make test needs these Debian packages, and this is no Debian: $$missing"; exit 1; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif sudo -n true 2>/dev/null; then sudo=sudo; else \
		echo "make test needs these Debian packages; install them, then run it again:"; \
		echo "  sudo apt-get install -y --no-install-recommends $$(echo $$missing)"; exit 1; fi; \
	echo "installing Debian packages: $$(echo $$missing)"; \
	$$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends $$missing >/dev/null

serve: $(STAMP) ## Serve the default model on $(HOST):$(PORT) (VIT_* variables configure it)
	$(VENV)/bin/bentoml serve service.service:VitClassifier --host $(HOST) --port $(PORT)

test: system $(STAMP) lint ## Install what the tests need, lint, run the whole suite (unit, http, integration, e2e)
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP) ## Unit tests only
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-http: $(STAMP) ## The ASGI app in-process with a tiny model (seconds)
	$(PY) -m pytest tests/http $(PYTEST_ARGS)

test-e2e: system $(STAMP) ## The web page in headless Chromium
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

test-integration: system $(STAMP) ## Tests against a real bentoml serve, Prometheus, locust
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

fuzz: $(STAMP) ## Long fuzzing, not in make test: decoder + multipart reader for FUZZ_SECONDS (600), the HTTP API for FUZZ_API_CASES (20000), gRPC for FUZZ_GRPC_CASES (20000)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -s tests/unit/test_decoder_fuzz.py $(PYTEST_ARGS)
	FUZZ_API_CASES=$(FUZZ_API_CASES) $(PY) -m pytest -s tests/integration/test_fuzz_api.py $(PYTEST_ARGS)
	FUZZ_GRPC_CASES=$(FUZZ_GRPC_CASES) $(PY) -m pytest -s tests/integration/test_fuzz_grpc.py $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint + format check, mypy on service/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP) ## Apply ruff format and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

train: $(STAMP) ## Retrain the default checkpoint into models/vit-digits
	$(PY) -m models.train_digits --out models/vit-digits

evaluate: $(STAMP) ## Score a digits checkpoint on held-out + out-of-distribution digits (MODEL=local-dir:...)
	$(PY) -m models.evaluate_digits "$(or $(MODEL),local-dir:models/vit-digits)" --path service

depth-study: $(STAMP) ## Train depth 2/4/6/8 (+ the old recipe) -> results/depth-study (~23 min, not in CI)
	$(PY) -m models.depth_study --out results/depth-study

import-model: $(STAMP) ## Put SOURCE into the BentoML model store as NAME (make import-model SOURCE=... NAME=...)
	$(PY) -m models.import_model "$(SOURCE)" --name "$(NAME)"

loadtest: $(STAMP) ## Headless locust run (USERS, DURATION s, MAX_P95_MS, SHAPE=steady|ramp|spike, URL=running service)
	$(PY) -m loadtests.loadtest --users $(USERS) --duration $(DURATION) --max-p95-ms $(MAX_P95_MS) \
		--shape $(SHAPE) $(if $(URL),--host $(URL))

bench: $(STAMP) triton-env ## Offline vs served, ours vs a hand-written peer, ours vs Triton on the protocol -> results/bench-{cpu,oip}.{json,md}
	$(PY) -m loadtests.bench cpu
	$(PY) -m loadtests.oip_bench

bench-oip: $(STAMP) triton-env ## Ours beside Triton (PyTriton and tritonserver) on the Open Inference Protocol -> results/bench-oip.{json,md}
	$(PY) -m loadtests.oip_bench

# Triton's venv (requirements-triton.txt says why Debian's python3.11), the project's venv behind it.
TRITON_PYTHON := /usr/bin/python3.11
triton-env: $(STAMP) ## .venv/triton: the nvidia-pytriton wheel (tritonserver) for the benchmark's Triton peer
	@test -x $(TRITON_PYTHON) || { echo "$(TRITON_PYTHON) (Debian's python3.11) is needed"; exit 1; }
	test -x $(VENV)/triton/bin/python || $(TRITON_PYTHON) -m venv $(VENV)/triton
	$(VENV)/triton/bin/pip install --quiet -r requirements-triton.txt
	printf '%s\n%s\n' "$$(cd $(VENV) && pwd)/lib/python3.11/site-packages" "$(CURDIR)" \
		> $(VENV)/triton/lib/python3.11/site-packages/zz_vit_serve.pth

overload: $(STAMP) ## Goodput at 2x and 5x capacity beside the peer, sharing cores then pinned apart -> results/overload{,-pinned}.{json,md}
	$(PY) -m loadtests.overload --rounds 3
	$(PY) -m loadtests.overload --rounds 3 --pin

storm: $(STAMP) ## Goodput under a retry storm (wrk -c400 resending at once) over capacity, shared then pinned -> results/storm{,-pinned}.{json,md}
	$(PY) -m loadtests.storm
	$(PY) -m loadtests.storm --pin

soak: $(STAMP) ## Open-loop soak of a fresh local service at 80% of capacity for MINUTES (10), not in make test -> results/soak.json
	$(PY) -m loadtests.soak --minutes $(MINUTES)

rehearsal: $(STAMP) ## Kubernetes rehearsed as processes: 3 replicas behind HAProxy, Prometheus, locust, SIGTERM + SIGKILL, KEDA query -> results/rehearsal.json
	$(PY) -m loadtests.rehearsal --users $(or $(REHEARSAL_USERS),128)

container-test: $(STAMP) ## Build the image with podman (no registry), run it, classify, scrape, stop -> results/container-test.json
	$(PY) -m loadtests.container_check

clean: ## Remove caches and results (keeps .venv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis results
