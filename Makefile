# sdc developer entry points. Each target sets up .venv itself, so on a fresh machine
# `make demo` and `make test` are each one command.
#
# torch is installed first and pinned: torch==2.13.0 is a CPU build on this project's machines;
# an unpinned torch (or anything asking for one before it is installed) pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SDC    := $(VENV)/bin/sdc
STAMP  := $(VENV)/.sdc-installed
TORCH  := torch==2.13.0

.PHONY: venv demo test bench tiny-model clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Build the built-in sdc-tiny (CPU target: fp32), show the build, and draw the prompt it prints.
DEMO_PROMPT ?= a red circle on a blue background
demo: venv
	$(SDC) build --precision fp32
	$(SDC) inspect artifacts/sdc-tiny-fp32
	@echo 'prompt: "$(DEMO_PROMPT)"'
	$(SDC) run "$(DEMO_PROMPT)" -a artifacts/sdc-tiny-fp32 --seed 0 --out outputs/demo.png

test: venv
	$(PY) -m pytest -q

# Full-size SD1.5 architecture (random weights): build and run time, peak RSS, sizes, against
# a bare torch export and diffusers' pipeline. Not a test; ~30 min on 2 cores, ~25 GB in BENCH_DIR.
BENCH_DIR ?= /tmp/sdc-bench
bench: venv
	$(PY) bench/build_fullsize.py --work $(BENCH_DIR) --keep
	$(PY) bench/run_fullsize.py --work $(BENCH_DIR)
	$(PY) bench/budget_fullsize.py --work $(BENCH_DIR) --budgets 3GiB 2GiB
	$(PY) bench/lora_fullsize.py --work $(BENCH_DIR)
	$(PY) bench/train_fullsize.py --work $(BENCH_DIR)

# Retrain the built-in sdc-tiny from scratch (~40 min on 2 CPU cores) and evaluate it through the
# ONNX path; writes export/data/sdc-tiny with its model card.
tiny-model: venv
	$(PY) -m sdc.training.train_tiny --out export/data/sdc-tiny
	$(PY) bench/tiny_eval.py export/data/sdc-tiny --record --grid docs/sdc-tiny-grid.png

clean:
	rm -rf artifacts/sdc-tiny-* .pytest_cache
