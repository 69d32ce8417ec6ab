"""The pack inside a real ComfyUI: registration, loading, and the generated model through ComfyUI's loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_server import PACK_NAME, ComfyServer, execution_error, prepare_base

ROOT = Path(__file__).resolve().parents[2]
NODE_IDS = [
    "BlipDiffusionLoader", "BlipDiffusionSubjectEncoderLoader", "BlipDiffusionSubjectEncoder",
    "BlipDiffusionMultimodalPromptFuse", "BlipDiffusionSampler", "BlipDiffusionPLMSSampler",
    "BlipDiffusionReferenceSigmas", "BlipDiffusionSubjectBlend", "BlipDiffusionSaveSubject", "BlipDiffusionLoadSubject",
    "BlipDiffusionControlNetLoader", "BlipDiffusionControlNetApply", "BlipDiffusionCannyEdges", "BlipDiffusionHEDEdges",
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


def test_log_shows_no_import_failure_for_the_pack(comfy):
    log = comfy.log.read_text(errors="replace")
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_NAME in line]
    assert not failed, failed
    assert f"custom_nodes/{PACK_NAME}" in log  # it was imported at all


def test_without_controlnet_aux_only_the_edge_nodes_are_disabled(tmp_path):
    """A second real server that sees controlnet-aux as not installed: the pack still loads, minus the two
    nodes that need it, and the log says which and how to fix it."""
    with ComfyServer(prepare_base(tmp_path), hide_modules=["controlnet_aux"]) as server:
        info = server.get_json("/object_info")
        log = server.log.read_text(errors="replace")
    edge_nodes = {"BlipDiffusionCannyEdges", "BlipDiffusionHEDEdges"}
    assert not edge_nodes & set(info)
    assert set(NODE_IDS) - edge_nodes <= set(info)
    assert "controlnet-aux is not installed" in log and "pip install controlnet-aux" in log
    assert "BLIP-Diffusion Canny Edges" in log and "BLIP-Diffusion HED Edges" in log
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_NAME in line]


def test_model_folder_is_listed(comfy, tiny_model):
    options = comfy.get_json("/object_info/BlipDiffusionLoader")["BlipDiffusionLoader"]["input"]["required"]
    assert tiny_model in options["model_name"][1]["options"]


def test_generated_model_loads_through_comfyui_loaders(comfy, tiny_model):
    """UNet, CLIP and VAE of tools/make_tiny_model.py's folder go through ComfyUI's own loaders."""
    entry = comfy.run_ok({
        "1": {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": tiny_model, "weight_dtype": "auto"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                                                   "latent_image": ["3", 0], "seed": 1, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "t_loaders"}},
    })
    assert comfy.image(entry, "6").shape == (64, 64, 3)
    assert "Requested to load SDXL" not in comfy.log.read_text()


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
    entry = comfy.run({"1": {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": "no_vae", "weight_dtype": "auto"}},
                       "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}}})
    error = execution_error(entry)
    assert error and error["node_type"] == "BlipDiffusionLoader"
    assert "vae/" in error["exception_message"] and "diffusion_pytorch_model" in error["exception_message"]
