# Two commands do all the set-up: `make demo` (the main job, end to end) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LLMOS := $(VENV)/bin/llmos
# CPU-only machines get the CPU build of torch; machines with an NVIDIA GPU keep (or get) a CUDA build.
TORCH_CONSTRAINT := $(if $(shell command -v nvidia-smi 2>/dev/null),,-c constraints/cpu.txt)
STAMP := $(VENV)/.installed
DEMO := recipes/pipeline-quickstart.yaml

.PHONY: install demo test test-all bench bench-quick gpu-wheels gpu-check lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_CONSTRAINT) -e ".[all,dev]"
	touch $(STAMP)

demo: install
	$(LLMOS) run $(DEMO)
	$(LLMOS) generate runs/quickstart --prompt "def fibonacci(n):" --max-new-tokens 48
	@echo
	@echo "demo done:"
	@echo "  prepared data + tokenizer + report  runs/data/quickstart/"
	@echo "  training log                        runs/quickstart/metrics.jsonl"
	@echo "  checkpoints                         runs/quickstart/checkpoints/"
	@echo "  final model (HF format)             runs/quickstart/final/"
	@echo "  evaluation                          runs/quickstart/eval.json"
	@echo "  pipeline state + lock (replayable)  runs/quickstart/pipeline.json, runs/quickstart/llmos.lock"
	@echo "  model library                       $${LLMOS_HOME:-~/.llmos}  (llmos models list)"

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

bench: install
	$(PY) -m bench.run

bench-quick: install
	$(PY) -m bench.run --quick

# The GPU check (docs/gpu.md): `make gpu-wheels` on a machine with PyPI fills $(WHEELS) for the GPU box's
# Python; copy the checkout with it to the box, where `make gpu-check` needs only torch and transformers.
WHEELS ?= gpu-wheels
GPU_PYTHON_VERSION ?= 3.12

gpu-wheels: install
	$(PY) -m bench.gpu_check --build-wheels $(WHEELS) --python-version $(GPU_PYTHON_VERSION)

gpu-check:
	$(PYTHON) -m bench.gpu_check $(if $(wildcard $(WHEELS)),--wheels $(WHEELS),)

lint: install
	$(VENV)/bin/ruff check llmos_cli tests bench
	$(VENV)/bin/ruff format --check llmos_cli tests bench

format: install
	$(VENV)/bin/ruff check --fix llmos_cli tests bench
	$(VENV)/bin/ruff format llmos_cli tests bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
