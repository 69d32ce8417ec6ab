"""The pack inside a real ComfyUI: registration, loading, and the generated model through ComfyUI's loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip_diffusion_nodes.tests.graphs import Graph, previewed
from blip_diffusion_nodes.tools.comfy_server import PACK_NAME, ComfyServer, execution_error, prepare_base

ROOT = Path(__file__).resolve().parents[2]
NODE_IDS = [
    "BlipDiffusionLoader",
    "BlipDiffusionSubjectEncoderLoader",
    "BlipDiffusionSubjectEncoder",
    "BlipDiffusionMultimodalPromptFuse",
    "BlipDiffusionSampler",
    "BlipDiffusionPLMSSampler",
    "BlipDiffusionReferenceSigmas",
    "BlipDiffusionSubjectBlend",
    "BlipDiffusionSaveSubject",
    "BlipDiffusionLoadSubject",
    "BlipDiffusionControlNetLoader",
    "BlipDiffusionControlNetApply",
    "BlipDiffusionCannyEdges",
    "BlipDiffusionHEDEdges",
    "BlipDiffusionEditPrompt",
    "BlipDiffusionPromptToPrompt",
]


def test_every_node_is_registered(comfy):
    info = comfy.get_json("/object_info")
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"not registered: {missing}"
    for node_id in NODE_IDS:
        assert info[node_id]["python_module"].endswith(PACK_NAME)
        assert info[node_id]["category"].startswith("BLIP-Diffusion")


def test_every_input_has_a_tooltip(comfy):
    info = comfy.get_json("/object_info")
    for node_id in NODE_IDS:
        for section in ("required", "optional"):
            for name, spec in info[node_id]["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_without_controlnet_aux_only_the_edge_nodes_are_disabled(tmp_path):
    """A second real server that sees controlnet-aux as not installed: the pack still loads, minus the two
    nodes that need it, and the log says which and how to fix it."""
    with ComfyServer(prepare_base(tmp_path), hide=["controlnet_aux"]) as server:
        info = server.get_json("/object_info")
        log = server.log.read_text(errors="replace")
    edge_nodes = {"BlipDiffusionCannyEdges", "BlipDiffusionHEDEdges"}
    assert not edge_nodes & set(info)
    assert set(NODE_IDS) - edge_nodes <= set(info)
    assert "controlnet-aux is not installed" in log and "pip install controlnet-aux" in log  # the pack's own line
    assert "BLIP-Diffusion Canny Edges" in log and "BLIP-Diffusion HED Edges" in log


def test_a_comfyui_without_an_internal_disables_only_the_nodes_that_use_it(tmp_path, tiny_model, comfy_base):
    """A real server whose ComfyUI lacks comfy.samplers.KSamplerX0Inpaint (as a future version might): the two
    reference samplers are gone, the log names the version, the symbol and the nodes, and the rest works."""
    base = prepare_base(tmp_path)
    (base / "models" / "blip_diffusion" / tiny_model).symlink_to(comfy_base / "models" / "blip_diffusion" / tiny_model)
    with ComfyServer(base, hide=["comfy.samplers:KSamplerX0Inpaint"]) as server:
        info = server.get_json("/object_info")
        log = server.log.read_text(errors="replace")
        entry = server.run_ok(
            previewed("BlipDiffusionSubjectEncoderLoader", model_name=tiny_model, weight_dtype="auto")
        )
    samplers = {"BlipDiffusionSampler", "BlipDiffusionPLMSSampler"}
    assert not samplers & set(info)
    assert set(NODE_IDS) - samplers <= set(info)
    line = next(line for line in log.splitlines() if "comfy.samplers:KSamplerX0Inpaint" in line)
    assert "ComfyUI 0.3.75" in line and "BlipDiffusionSampler" in line and "BlipDiffusionPLMSSampler" in line
    assert entry["outputs"]["2"]  # a node that needs no sampler internals still runs


def test_model_folder_is_listed(comfy, tiny_model):
    options = comfy.get_json("/object_info/BlipDiffusionLoader")["BlipDiffusionLoader"]["input"]["required"]
    assert tiny_model in options["model_name"][1]["options"]


def test_generated_model_loads_through_comfyui_loaders(comfy, tiny_model):
    """UNet, CLIP and VAE of tools/make_tiny_model.py's folder go through ComfyUI's own loaders."""
    g = Graph()
    loader = g.add("BlipDiffusionLoader", model_name=tiny_model, weight_dtype="auto")[0]
    text = g.add("CLIPTextEncode", clip=[loader, 1], text="a cat")
    samples = g.add(
        "KSampler",
        model=[loader, 0],
        positive=text,
        negative=text,
        latent_image=g.add("EmptyLatentImage", width=64, height=64, batch_size=1),
        seed=1,
        steps=1,
        cfg=1.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    g.add("SaveImage", "6", images=g.add("VAEDecode", samples=samples, vae=[loader, 2]), filename_prefix="t_loaders")
    assert comfy.image(comfy.run_ok(g), "6").shape == (64, 64, 3)


@pytest.mark.parametrize("twin", sorted((ROOT / "workflows" / "api").glob("*.json")), ids=lambda p: p.stem)
def test_api_twins_use_only_known_nodes(comfy, twin):
    info = comfy.get_json("/object_info")
    prompt = json.loads(twin.read_text())
    assert {n["class_type"] for n in prompt.values()} <= set(info)


def test_missing_component_names_folder_and_file(comfy, comfy_base, tiny_model):
    broken = comfy_base / "models" / "blip_diffusion" / "no_vae"
    broken.mkdir()
    for item in (comfy_base / "models" / "blip_diffusion" / tiny_model).iterdir():
        if item.name != "vae":
            (broken / item.name).symlink_to(item)
    entry = comfy.run(previewed("BlipDiffusionLoader", 2, model_name="no_vae", weight_dtype="auto"))
    error = execution_error(entry)
    assert error and error["node_type"] == "BlipDiffusionLoader"
    assert "vae/" in error["exception_message"] and "diffusion_pytorch_model" in error["exception_message"]
