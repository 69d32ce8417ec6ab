"""A full-size random BLIP-Diffusion folder with pickle .bin files, as users download it, through the loader node."""

from __future__ import annotations

import pytest

from blip_diffusion_nodes.tests.graphs import probe, zero_shot
from blip_diffusion_nodes.tools.make_tiny_model import make_model


@pytest.fixture(scope="module")
def full_model(comfy, comfy_base):
    """Released shapes and key names (1.56 B parameters), fp16 to halve the disk; deleted afterwards."""
    import shutil

    folder = make_model(comfy_base / "models" / "blip_diffusion" / "full-bin", size="full", fmt="bin")
    yield folder.name
    comfy.request("POST", "/free", {"unload_models": True, "free_memory": True})
    shutil.rmtree(folder)


@pytest.mark.slow
def test_full_size_bin_folder_loads_and_generates(comfy, full_model):
    graph = zero_shot(full_model, size=64, steps=1, prefix="full_size")
    probe(graph, "20", "full_subject", subject=["3", 0], conditioning=["4", 0])
    entry = comfy.run_ok(graph, timeout=1200)
    tensors, _ = comfy.probe("full_subject")
    assert tensors["subject"].shape == (1, 16, 768) and tensors["cond0"].shape == (1, 77, 768)
    assert comfy.image(entry, "9").shape == (64, 64, 3)  # the loader refuses missing or unexpected UNet tensors
