#!/usr/bin/env bash
# The pinned side venv where the real diffusers BLIP-Diffusion pipelines run (parity fixtures, benchmarks).
#   tools/reference/setup_env.sh VENV
# diffusers 0.39.0 + transformers 4.53.3 is the newest pair that runs them (transformers >= 4.54 breaks
# them; diffusers >= 0.40 forces transformers 5). Never imported by the pack.
set -euo pipefail
VENV=${1:-.refvenv}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3.11}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -c "$HERE/../torch-pin.txt" -c "$HERE/constraints.txt" \
  torch diffusers==0.39.0 transformers==4.53.3 safetensors
# The repository's tools (the tiny-model maker's digest, the reference runners) as `blip_diffusion_nodes`, without
# the pack's own requirements: this venv keeps its pinned transformers.
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$HERE/../.."
"$VENV/bin/python" -c "import diffusers, transformers; print('reference venv ready:', diffusers.__version__, transformers.__version__)"
