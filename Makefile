# Developer commands. `make demo` and `make test` set up everything they need (idempotently).
VENV ?= .venv
REFVENV ?= .refvenv
LINTVENV ?= .lintvenv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
PYTEST := $(PY) -m pytest -v -rs
# The ComfyUI tree the tests run (the one `make setup` installs, or $COMFYUI_DIR); evaluated when used.
COMFYUI_DIR = $(shell $(PY) -c "from blip_diffusion_nodes.tools.comfy_server import comfyui_dir; print(comfyui_dir())")

SETUP_INPUTS := tools/setup_env.sh tools/constraints.txt tools/torch-pin.txt requirements.txt requirements-test.txt pyproject.toml
REF_INPUTS := tools/reference/setup_env.sh tools/reference/constraints.txt tools/torch-pin.txt pyproject.toml

.PHONY: setup demo batch-demo lint test fixtures workflows ui-deps bench bench-batch gpu-check

setup: $(VENV)/.ready

$(VENV)/.ready: $(SETUP_INPUTS)
	tools/setup_env.sh $(VENV)
	touch $@

$(REFVENV)/.ready: $(REF_INPUTS)
	tools/reference/setup_env.sh $(REFVENV)
	touch $@

# ruff and comfy-cli in a venv of their own: comfy-cli brings uv, ffmpeg and telemetry clients the pack never needs.
$(LINTVENV)/.ready: tools/lint-requirements.txt
	[ -x $(LINTVENV)/bin/python ] || python3.11 -m venv $(LINTVENV)
	$(LINTVENV)/bin/pip install -q --disable-pip-version-check -r tools/lint-requirements.txt
	touch $@

# Debian's Chromium and playwright-core for the browser tests (tests/ui).
ui-deps: tests/ui/node_modules/.ready

tests/ui/node_modules/.ready: tests/ui/package.json tests/ui/package-lock.json
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	cd tests/ui && npm ci --silent --no-audit --no-fund
	touch $@

# The main job on an embedded default: a headless ComfyUI runs workflows/api/zero_shot.json on a generated tiny model.
demo: $(VENV)/.ready
	$(PY) tools/demo.py

# The batch runner (batch/run.py) on the demo's tiny model: batch/examples/subjects.csv, 8 jobs on 2 local CPU workers.
batch-demo: $(VENV)/.ready
	$(PY) tools/demo.py --batch --size 128 --steps 4

# ruff (lint, format, security rules, banned imports), the pack's own static safety checks, and the registry's
# validation (comfy node validate), which must pass without a warning.
lint: $(LINTVENV)/.ready $(VENV)/.ready
	$(LINTVENV)/bin/ruff check .
	$(LINTVENV)/bin/ruff format --check .
	$(PY) tools/lint_safety.py
	$(LINTVENV)/bin/comfy --skip-prompt --no-enable-telemetry node validate > $(LINTVENV)/validate.log 2>&1; \
		status=$$?; cat $(LINTVENV)/validate.log; [ $$status -eq 0 ] && ! grep -qi "warning" $(LINTVENV)/validate.log

# The test pyramid: core (fast), node helpers in-process with ComfyUI's modules, then a real ComfyUI server
# (parity with the reference included), the batch runner on real Ray with real ComfyUI workers, and a real browser.
test: lint $(VENV)/.ready $(REFVENV)/.ready ui-deps
	$(PYTEST) tests/unit tests/parity
	PYTHONPATH=$(COMFYUI_DIR) $(PYTEST) tests/nodes
	REFERENCE_PYTHON=$(abspath $(REFVENV))/bin/python $(PYTEST) tests/comfy tests/batch tests/ui $(PYTEST_ARGS)

# Re-run the real reference for the committed core fixtures (tests/fixtures/core_parity.npz).
fixtures: $(VENV)/.ready $(REFVENV)/.ready
	rm -rf .cache/micro && $(PY) tools/make_tiny_model.py .cache/micro --size micro
	$(REFVENV)/bin/python tools/reference/make_parity_fixtures.py .cache/micro tests/fixtures/core_parity.npz

# Rewrite the UI workflows (workflows/*.json) from their API twins (workflows/api/*.json).
workflows: $(VENV)/.ready
	$(PY) tools/workflows.py

# The pack against the real reference on full-size random weights (CPU here; --device cuda on a GPU).
bench: $(VENV)/.ready $(REFVENV)/.ready
	REFERENCE_PYTHON=$(abspath $(REFVENV))/bin/python $(PY) bench/run.py $(BENCH_ARGS)

# The batch runner with 1 and 2 workers against a client posting the same jobs to one server (tiny model, CPU).
bench-batch: $(VENV)/.ready
	$(PY) bench/batch.py $(BENCH_BATCH_ARGS)

# The GPU numbers in one call on a fresh CUDA machine: parity with the reference, the bench at 512x512 / 25 steps /
# fp16 with peak GPU memory, and a ControlNet image, as one markdown table (.cache/gpu_check/gpu_check.md).
# GPU_CHECK_ARGS=--dry-run: the same steps on the CPU at tiny sizes (make test runs it: tests/comfy/test_gpu_check.py).
gpu-check: $(VENV)/.ready $(REFVENV)/.ready
	REFERENCE_PYTHON=$(abspath $(REFVENV))/bin/python $(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)
