# sdc developer entry points. Each target sets up .venv itself, so on a fresh machine
# `make demo` and `make test` are each one command.
#
# Every environment installs the exact versions the suite was run with, from the locks in
# requirements/ (`make lock` regenerates them with uv from pyproject.toml + requirements/torch-cpu.txt).
# torch is the CPU build pinned there: an unpinned torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SDC    := $(VENV)/bin/sdc
STAMP  := $(VENV)/.sdc-installed
LOCK   := requirements/dev.txt
RT_LOCK := requirements/runtime.txt
RT_VENV := .venv-runtime
# Where the CPU torch wheel comes from: this project's machines keep it in /opt/wheels (pip's
# find-links there already); elsewhere, PyTorch's CPU index.
TORCH_SRC := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: venv venv-runtime runtime-check demo test test-browser test-families test-ray browser-deps test-latest lock bench bench-cpu tiny-model clean interop interop-lock

# The lock installs everything (torch first in its own call, so nothing can pull another torch),
# then sdc itself without dependencies; `pip check` proves the set is consistent.
$(STAMP): pyproject.toml Makefile $(LOCK) requirements/torch-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q $(TORCH_SRC) -r requirements/torch-cpu.txt
	$(PY) -m pip install -q $(TORCH_SRC) -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

venv: $(STAMP)

# Edge-box environment from the runtime lock: no torch, no diffusers, no transformers.
$(RT_VENV)/.sdc-installed: pyproject.toml Makefile $(RT_LOCK)
	test -x $(RT_VENV)/bin/python || $(PYTHON) -m venv $(RT_VENV)
	$(RT_VENV)/bin/python -m pip install -q --upgrade pip==26.3
	$(RT_VENV)/bin/python -m pip install -q -r $(RT_LOCK)
	$(RT_VENV)/bin/python -m pip install -q --no-deps -e .
	$(RT_VENV)/bin/python -m pip check
	touch $@

venv-runtime: $(RT_VENV)/.sdc-installed

# The runtime lock works on its own: build sdc-tiny with .venv, then with .venv-runtime (no
# torch) quantize it to int4 and to w8a8 and generate from each.
runtime-check: venv venv-runtime
	$(SDC) build --precision fp32 --out artifacts/sdc-tiny-runtime-check --force
	! $(RT_VENV)/bin/python -c 'import torch' 2>/dev/null
	$(RT_VENV)/bin/sdc run "a red circle on a blue background" -a artifacts/sdc-tiny-runtime-check \
	    --seed 0 --out outputs/runtime-check.png
	$(RT_VENV)/bin/sdc build --from artifacts/sdc-tiny-runtime-check --precision int4 \
	    --out artifacts/sdc-tiny-runtime-check-int4 --force
	$(RT_VENV)/bin/sdc run "a red circle on a blue background" -a artifacts/sdc-tiny-runtime-check-int4 \
	    --seed 0 --out outputs/runtime-check-int4.png
	$(RT_VENV)/bin/sdc build --from artifacts/sdc-tiny-runtime-check --precision w8a8 \
	    --out artifacts/sdc-tiny-runtime-check-w8a8 --force
	$(RT_VENV)/bin/sdc run "a red circle on a blue background" -a artifacts/sdc-tiny-runtime-check-w8a8 \
	    --seed 0 --out outputs/runtime-check-w8a8.png
	$(RT_VENV)/bin/python requirements/serve_smoke.py $(RT_VENV)/bin/sdc artifacts/sdc-tiny-runtime-check \
	    outputs/runtime-check-serve.png
	cmp outputs/runtime-check.png outputs/runtime-check-serve.png

# Locks: uv resolves pyproject.toml's extras for this project's machines (CPython 3.11, x86-64
# Linux) with the torch pin as a constraint. Run after changing dependencies in pyproject.toml,
# then `make test` and commit requirements/*.txt. uv itself is pinned and lives in .venv-tools.
UV_VENV := .venv-tools
UV      := $(UV_VENV)/bin/uv
UV_PIN  := uv==0.13.9 packaging==26.4
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	-c requirements/torch-cpu.txt $(TORCH_SRC)

$(UV):
	test -x $(UV_VENV)/bin/python || $(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install -q $(UV_PIN)

lock: $(UV)
	$(UV) pip compile -q pyproject.toml --extra dev $(LOCK_FLAGS) --custom-compile-command 'make lock' -o $(LOCK)
	$(UV) pip compile -q pyproject.toml --extra runtime --extra quantize --extra serve $(LOCK_FLAGS) --custom-compile-command 'make lock' -o $(RT_LOCK)

# Opt-in drift check: the suite against the newest releases the registry serves today, upper
# bounds in pyproject.toml lifted (requirements/unbounded.py), in its own .venv-latest. Writes
# what moved and how the suite ended to bench/results/test-latest.txt; fails when the suite fails.
LATEST_VENV := .venv-latest
test-latest: $(UV)
	bash requirements/test_latest.sh $(UV) $(LATEST_VENV) "$(LOCK_FLAGS)" "$(TORCH_SRC)"

# Build the built-in sdc-tiny (CPU target: fp32), show the build, and draw the prompt it prints.
DEMO_PROMPT ?= a red circle on a blue background
demo: venv
	$(SDC) build --precision fp32
	$(SDC) inspect artifacts/sdc-tiny-fp32
	@echo 'prompt: "$(DEMO_PROMPT)"'
	$(SDC) run "$(DEMO_PROMPT)" -a artifacts/sdc-tiny-fp32 --seed 0 --out outputs/demo.png

test: venv
	$(PY) -m pytest -q

# The web page in a real headless browser (tests marked `browser`): Debian's chromium and its
# driver, installed here when missing (apt, as root), then those tests only.
browser-deps:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	    { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

test-browser: venv browser-deps
	$(PY) -m pytest -q -m browser

# SD2.x/SDXL build variants (tests marked `families`: an SDXL single file built with chunks and
# streamed under a budget, a LoRA and an embedding fused at build, an int4 SDXL); ~5 min.
test-families: venv
	$(PY) -m pytest -q -m families

# Ray Serve scale-out proofs (tests marked `ray`: 2 replicas, a killed replica, autoscaling),
# a local Ray cluster on 127.0.0.1 started and stopped by the tests; ~3 min on 2 cores.
test-ray: venv
	$(PY) -m pytest -q -m ray

# Full-size SD1.5 architecture (random weights): build and run time, peak RSS, sizes, against
# a bare torch export and diffusers' pipeline. Not a test; ~30 min on 2 cores, ~25 GB in BENCH_DIR.
BENCH_DIR ?= /tmp/sdc-bench
bench: venv
	$(PY) bench/build_fullsize.py --work $(BENCH_DIR) --keep
	$(PY) bench/run_fullsize.py --work $(BENCH_DIR)
	$(PY) bench/budget_fullsize.py --work $(BENCH_DIR) --budgets 3GiB 2GiB
	$(PY) bench/lora_fullsize.py --work $(BENCH_DIR)
	$(PY) bench/train_fullsize.py --work $(BENCH_DIR)
	$(PY) bench/quant_fullsize.py --work $(BENCH_DIR)
	$(PY) bench/serve_fullsize.py --build $(BENCH_DIR)/sd15-fp32 --work $(BENCH_DIR) --make-loras \
	    --steps 10 --requests 2 --lora-steps 2
	$(SDC) build --precision fp32
	$(PY) bench/ray_throughput.py --build artifacts/sdc-tiny-fp32
	$(MAKE) bench-cpu

# CPU speed against OpenVINO (optimum-intel, fp32 and its default bf16-where-the-CPU-has-it) and
# diffusers, same script and latents (bench/cpu_speed.py): 512² and 256², batch 1 and 4, sdc fp32
# and w8a8. OpenVINO lives in its own .venv-openvino (requirements/openvino.txt, torch first).
# ~1 h on 2 cores, on a quiet machine; makes BENCH_DIR/sd15-random and the builds when missing.
OV_VENV := .venv-openvino
$(OV_VENV)/.installed: Makefile requirements/openvino.txt requirements/torch-cpu.txt
	test -x $(OV_VENV)/bin/python || $(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install -q --upgrade pip==26.3
	$(OV_VENV)/bin/python -m pip install -q $(TORCH_SRC) -r requirements/torch-cpu.txt
	$(OV_VENV)/bin/python -m pip install -q --no-deps $(TORCH_SRC) -r requirements/openvino.txt
	@# optimum-intel declares torchvision, which its SD pipelines never import; PyPI's
	@# torchvision is built for the CUDA torch and breaks every import against the CPU one
	@# ("operator torchvision::nms does not exist"), so the lock leaves it out and pip check
	@# may report exactly that line
	$(OV_VENV)/bin/python -m pip check | grep -v '^optimum-intel .* requires torchvision, which is not installed' \
	    | grep . && exit 1 || true
	$(OV_VENV)/bin/python -c "from optimum.intel import OVStableDiffusionPipeline"
	touch $@

bench-cpu: venv $(OV_VENV)/.installed
	$(PY) bench/cpu_speed.py --work $(BENCH_DIR) --ov-python $(OV_VENV)/bin/python

# Retrain the built-in sdc-tiny from scratch (~40 min on 2 CPU cores) and evaluate it through the
# ONNX path; writes export/data/sdc-tiny with its model card.
tiny-model: venv
	$(PY) -m sdc.training.train_tiny --out export/data/sdc-tiny
	$(PY) bench/tiny_eval.py export/data/sdc-tiny --record --grid docs/sdc-tiny-grid.png

clean:
	rm -rf artifacts/sdc-tiny-* .pytest_cache $(RT_VENV) $(LATEST_VENV) $(UV_VENV) $(OV_VENV)

# Opt-in interop check: a fresh sdc-tiny build (made with .venv's sdc) must load in Hugging Face
# Optimum's own ORTStableDiffusionPipeline and draw the same image as `sdc run` from the same
# latents, within 1/255 (bench/interop_optimum.py). Optimum pins an older transformers, so it
# lives in its own .venv-interop, installed from requirements/interop.txt (torch first, as above).
# Needs .venv (`make venv`); does not change it. Scratch files in INTEROP_DIR.
INTEROP_VENV := .venv-interop
INTEROP_PY   := $(INTEROP_VENV)/bin/python
INTEROP_DIR  ?= /tmp/sdc-interop

$(INTEROP_VENV)/.installed: Makefile requirements/interop.txt requirements/torch-cpu.txt
	test -x $(INTEROP_PY) || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_PY) -m pip install -q --upgrade pip==26.3
	$(INTEROP_PY) -m pip install -q $(TORCH_SRC) -r requirements/torch-cpu.txt
	$(INTEROP_PY) -m pip install -q $(TORCH_SRC) -c requirements/torch-cpu.txt -r requirements/interop.txt
	$(INTEROP_PY) -m pip check
	touch $@

interop: $(INTEROP_VENV)/.installed
	@test -x $(SDC) || { echo "interop: $(SDC) missing; run 'make venv' first"; exit 1; }
	$(INTEROP_PY) bench/interop_optimum.py --sdc $(SDC) --work $(INTEROP_DIR)

# Re-resolve requirements/interop.txt from requirements/interop.in (newest optimum-onnx and what
# it pins) in a throwaway venv, then `make interop` to check the new set.
interop-lock:
	rm -rf $(INTEROP_DIR)/lock-venv
	$(PYTHON) -m venv $(INTEROP_DIR)/lock-venv
	$(INTEROP_DIR)/lock-venv/bin/python -m pip install -q --upgrade pip==26.3
	$(INTEROP_DIR)/lock-venv/bin/python -m pip install -q $(TORCH_SRC) -r requirements/torch-cpu.txt
	$(INTEROP_DIR)/lock-venv/bin/python -m pip install -q $(TORCH_SRC) -c requirements/torch-cpu.txt -r requirements/interop.in
	{ echo '# Generated by `make interop-lock` (or by hand: a `pip freeze` of .venv-interop installed'; \
	  echo '# from requirements/interop.in with torch==2.13.0+cpu as a constraint). Python 3.11, x86-64 Linux.'; \
	  echo '# Do not edit; used by `make interop`.'; \
	  $(INTEROP_DIR)/lock-venv/bin/python -m pip freeze --exclude-editable; } > requirements/interop.txt
	rm -rf $(INTEROP_DIR)/lock-venv
