"""The batch runner's end-to-end fixtures: the runner's command line against real ComfyUI workers.

The workers use the shared test base folder (tests/conftest.py: this pack in custom_nodes/, the tiny
model in models/blip_diffusion/) and the zero-shot graph at 64x64 with 2 steps. Every test checks
afterwards that no Ray process and no worker ComfyUI outlived the run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest

from blip_diffusion_nodes.tests.graphs import zero_shot

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = {
    "cat": ROOT / "workflows" / "images" / "blipd_example_cat.jpg",
    "cup": ROOT / "workflows" / "images" / "blipd_example_cup.jpg",
}
MAPPING = {"image": "Subject photo.image", "category": "3.subject", "prompt": "4.prompt", "seed": "7.seed", "sku": None}


@pytest.fixture(scope="session")
def batch_inputs(tmp_path_factory, tiny_model) -> Path:
    """A folder with the workflow, the mapping and the subject photos the manifests name."""
    folder = tmp_path_factory.mktemp("batch_inputs")
    graph = zero_shot(tiny_model, size=64, steps=2, prefix="batch")
    graph["2"]["_meta"] = {"title": "Subject photo"}
    graph["4"]["inputs"]["image_weights"] = ""  # as the example workflows have it: a manifest may set it
    (folder / "workflow.json").write_text(json.dumps(graph, indent=1))
    (folder / "mapping.json").write_text(json.dumps(MAPPING))
    for name, path in SUBJECTS.items():
        shutil.copy(path, folder / f"{name}.jpg")
    return folder


def _ours(p: psutil.Process) -> bool:
    try:
        cmd = p.cmdline()
        name = p.name()
    except psutil.Error:
        return False
    text = " ".join(cmd)
    return (
        name in ("raylet", "gcs_server")
        or text.startswith("ray::")
        or "/site-packages/ray/" in text
        or "blipd-batch-w" in text
    )


@pytest.fixture(autouse=True)
def no_leftovers():
    """After a test, no Ray process and no worker ComfyUI that it started may still run."""
    before = {p.pid for p in psutil.process_iter() if _ours(p)}
    yield
    deadline = time.monotonic() + 30
    while True:
        left = [p for p in psutil.process_iter() if p.pid not in before and _ours(p) and p.status() != "zombie"]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline())[:200] for p in left]


@pytest.fixture
def env_for_runner(monkeypatch):
    """The runner as a user starts it: no Ray address inherited from the environment."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return os.environ
