"""Shared test fixtures: the real ComfyUI server, generated model folders, the reference fixtures.

The server (tools/comfy_server.py) runs with a base directory that links this pack and the
test-only probe pack (tests/comfy/probe_pack) into custom_nodes/ and holds a generated tiny
BLIP-Diffusion model in models/blip_diffusion/. It runs in float32 throughout: the parity
tests compare with the float32 reference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from blip_diffusion_nodes.tools.comfy_server import Comfy, ComfyServer, prepare_base
from blip_diffusion_nodes.tools.make_tiny_model import make_hed_annotator, make_model, weights_digest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

TINY = "blipdiffusion"  # models/blip_diffusion/blipdiffusion (with controlnet/), as the workflows name it
ANNOTATOR = "Annotators"  # models/annotators/Annotators/ControlNetHED.pth, as the workflows name it
SCRIBBLE = "sd-controlnet-scribble"  # models/controlnet/<this>/ (diffusers layout), as the workflows name it


# The server layers write about 8 GB at their peak (a full-size model folder, fine-tune files, outputs).
DISK_NEEDED_GB = 10


def pytest_report_header(config) -> list[str]:
    """The free disk where the tests write: a full disk fails every test that saves a file, far from the cause."""
    where = Path(tempfile.gettempdir())
    free = shutil.disk_usage(where).free / 1e9
    note = "" if free >= DISK_NEEDED_GB else f"; under the {DISK_NEEDED_GB} GB the server tests need at their peak"
    return [f"disk: {free:.0f} GB free in {where}{note}"]


class ReferenceFixture:
    """A .npz written by tools/reference/*: arrays by name plus a JSON `meta` entry."""

    def __init__(self, path: Path):
        self.path = path
        self.arrays = np.load(path)
        self.meta = json.loads(self.arrays["meta"].tobytes())

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


@pytest.fixture(scope="session")
def core_fixture() -> ReferenceFixture:
    return ReferenceFixture(FIXTURES / "core_parity.npz")


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Callable[..., dict[str, np.ndarray]]:
    """run(script, **request): a tools/reference/ script run in the pinned reference venv ($REFERENCE_PYTHON,
    else .refvenv) on the JSON request; the arrays it saved. `make test` builds the venv: a missing one fails."""
    python = Path(os.environ.get("REFERENCE_PYTHON", ROOT / ".refvenv" / "bin" / "python"))
    if not python.is_file():
        pytest.fail(f"the reference venv is missing ({python}): `make test` builds it")

    def run(script: str, **request) -> dict[str, np.ndarray]:
        folder = tmp_path_factory.mktemp("reference")
        (folder / "request.json").write_text(json.dumps(request))
        out = folder / "reference.npz"
        subprocess.run(
            [str(python), str(ROOT / "tools" / "reference" / script), str(folder / "request.json"), str(out)],
            check=True,
            timeout=900,
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        return dict(np.load(out))

    return run


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory, core_fixture) -> Path:
    """The micro model the core fixtures were made from, regenerated bit for bit."""
    path = make_model(tmp_path_factory.mktemp("models") / "micro", size="micro")
    if weights_digest(path) != core_fixture.meta["digest"]:
        pytest.fail(
            "tests/fixtures/core_parity.npz was made from other weights than tools/make_tiny_model.py "
            "writes now: run `make fixtures` to regenerate it with the reference"
        )
    return path


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    base = prepare_base(
        tmp_path_factory.mktemp("comfybase"), {"probe_pack": Path(__file__).parent / "comfy" / "probe_pack"}
    )
    for image in (ROOT / "workflows" / "images").glob("*.jpg"):  # what the example workflows load
        (base / "input" / image.name).write_bytes(image.read_bytes())
    return base


@pytest.fixture(scope="session")
def tiny_model(comfy_base) -> str:
    """Made before any workflow loads it: ComfyUI caches loader outputs by input values. Its weights are in both
    formats: the loaders read the safetensors files, and the front end finds the release's file names (pickles),
    which the example workflows list for its missing-models check."""
    make_model(comfy_base / "models" / "blip_diffusion" / TINY, size="tiny", fmt="both", controlnet=True)
    return TINY


@pytest.fixture(scope="session")
def hed_annotator(comfy_base) -> str:
    """A random HED annotator in the real file format, where the HED node and workflows look for it."""
    make_hed_annotator(comfy_base / "models" / "annotators" / ANNOTATOR / "ControlNetHED.pth")
    return ANNOTATOR


@pytest.fixture(scope="session")
def scribble_controlnet(comfy_base, tiny_model) -> str:
    """The workflows' scribble ControlNet (a diffusers folder in models/controlnet): the tiny model's ControlNet."""
    folder = comfy_base / "models" / "controlnet" / SCRIBBLE
    folder.mkdir(parents=True)
    for item in (comfy_base / "models" / "blip_diffusion" / tiny_model / "controlnet").iterdir():
        (folder / item.name).symlink_to(item)
    return f"{SCRIBBLE}/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def example_subject(comfy_base, tiny_model) -> str:
    """The subject file the subject_reuse workflow loads: the example cat encoded by the tiny model, in input/."""
    import hashlib

    import torch
    from PIL import Image

    from blip_diffusion_nodes.blip_core.subject import Subject
    from blip_diffusion_nodes.blip_core.subject_encoder import load_subject_encoder
    from blip_diffusion_nodes.blip_core.subject_file import save_subject

    pixels = np.asarray(Image.open(ROOT / "workflows" / "images" / "blipd_example_cat.jpg").convert("RGB"))
    image = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]  # as LoadImage makes it
    encoder = load_subject_encoder(comfy_base / "models" / "blip_diffusion" / tiny_model)
    metadata = {
        "preprocess": "squash",
        "encoder": tiny_model,
        "image_sha256": hashlib.sha256(image.numpy().tobytes()).hexdigest(),
    }
    name = "blipd_example_cat.safetensors"
    save_subject(Subject(encoder.encode(image, "cat"), "cat", metadata), comfy_base / "input" / name)
    return name


@pytest.fixture(scope="session")
def comfy(comfy_base, tiny_model, example_subject, hed_annotator, scribble_controlnet) -> Comfy:
    with ComfyServer(comfy_base, ["--force-fp32", "--fp32-text-enc", "--preview-method", "latent2rgb"]) as client:
        yield client
