"""The real ComfyUI server for the tests (see tools/comfy_server.py).

The session's base directory links this pack and the test-only probe pack into
custom_nodes/ and holds a generated tiny BLIP-Diffusion model in models/blip_diffusion/.
The server runs in float32 throughout: the parity tests compare with the float32 reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_server import Comfy, ComfyServer, execution_error, prepare_base  # noqa: F401  (execution_error for tests)
from make_tiny_model import make_model

TINY = "tiny"  # models/blip_diffusion/tiny, with a ControlNet


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    return prepare_base(tmp_path_factory.mktemp("comfybase"), {"probe_pack": Path(__file__).parent / "probe_pack"})


@pytest.fixture(scope="session")
def tiny_model(comfy_base) -> str:
    """Made before any workflow loads it: ComfyUI caches loader outputs by input values."""
    make_model(comfy_base / "models" / "blip_diffusion" / TINY, size="tiny", controlnet=True)
    return TINY


@pytest.fixture(scope="session")
def comfy(comfy_base, tiny_model) -> Comfy:
    with ComfyServer(comfy_base, ["--force-fp32", "--fp32-text-enc"]) as client:
        yield client
