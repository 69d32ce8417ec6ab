"""Zero-shot subject-driven generation through the real ComfyUI server (issue: zero-shot end to end)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blip_diffusion_nodes.blip_core.prompt import build_prompt
from blip_diffusion_nodes.tests.graphs import NEGATIVE, probe, shrink, twin, zero_shot
from blip_diffusion_nodes.tools.comfy_server import execution_error
from blip_diffusion_nodes.tools.context_clip import load_text_encoder
from blip_diffusion_nodes.tools.make_tiny_model import make_model

ROOT = Path(__file__).resolve().parents[2]
TWINS = sorted(p.stem for p in (ROOT / "workflows" / "api").glob("*.json"))


@pytest.fixture(scope="module")
def model_dir(comfy_base, tiny_model) -> Path:
    return comfy_base / "models" / "blip_diffusion" / tiny_model


@pytest.fixture(scope="module")
def text_encoder(model_dir):
    return load_text_encoder(model_dir)


@pytest.mark.parametrize("name", TWINS)
def test_workflow_twin_runs(comfy, name):
    """Every committed API twin runs as posted (smaller and with fewer steps) and saves images."""
    entry = comfy.run_ok(shrink(twin(name)))
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert images and comfy.image(entry, next(k for k, v in entry["outputs"].items() if v.get("images"))).shape[2] == 3


def test_fused_conditioning_equals_core_reference(comfy, tiny_model, text_encoder):
    """The CONDITIONING from ComfyUI's CLIP equals blip_core's context-aware text encoder (<= 1e-5, fp32)."""
    graph = probe(
        zero_shot(tiny_model, prompt="swimming underwater in a very long sentence " * 3),
        "20",
        "fuse",
        conditioning=["4", 0],
        subject=["3", 0],
    )
    del graph["9"], graph["8"], graph["7"]
    comfy.run_ok(graph)
    tensors, meta = comfy.probe("fuse")
    prompt = build_prompt("swimming underwater in a very long sentence " * 3, "cat")
    expected = text_encoder.encode([prompt], ctx=tensors["subject"], ctx_begin_pos=2)
    assert meta["category"] == "cat"
    assert tensors["cond0"].shape == (1, 77, 768)
    assert (tensors["cond0"] - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("strength", [0.0, 0.5])
def test_prompt_strength(comfy, tiny_model, text_encoder, strength):
    graph = probe(
        zero_shot(tiny_model, strength=strength, target="tiger"),
        "20",
        f"strength{strength}",
        conditioning=["4", 0],
        subject=["3", 0],
    )
    del graph["9"], graph["8"], graph["7"]
    comfy.run_ok(graph)
    tensors, _ = comfy.probe(f"strength{strength}")
    expected = text_encoder.encode([build_prompt("swimming underwater", "tiger", strength)], ctx=tensors["subject"])
    assert (tensors["cond0"] - expected).abs().max().item() <= 1e-5


def test_per_latent_subjects_pair_with_latents(comfy, tiny_model, text_encoder):
    """multi_image 'per latent': image i conditions latent i, in one CONDITIONING batch."""
    graph = zero_shot(tiny_model, batch=2, multi_image="per latent", prefix="per_latent")
    graph.add("ImageFlip", "10", image=["2", 0], flip_method="x-axis: vertically")
    graph.add("ImageBatch", "11", image1=["2", 0], image2=["10", 0])
    graph["3"]["inputs"]["image"] = ["11", 0]
    probe(graph, "20", "per_latent", conditioning=["4", 0], subject=["3", 0])
    entry = comfy.run_ok(graph)
    tensors, _ = comfy.probe("per_latent")
    assert tensors["subject"].shape[0] == 2 and tensors["cond0"].shape == (2, 77, 768)
    expected = text_encoder.encode([build_prompt("swimming underwater", "cat")] * 2, ctx=tensors["subject"])
    assert (tensors["cond0"] - expected).abs().max().item() <= 1e-5
    assert len(entry["outputs"]["9"]["images"]) == 2


def test_per_latent_batch_mismatch_is_a_clear_error(comfy, tiny_model):
    graph = zero_shot(tiny_model, batch=3, multi_image="per latent")
    graph.add("ImageBatch", "11", image1=["2", 0], image2=["2", 0])
    graph["3"]["inputs"]["image"] = ["11", 0]
    error = execution_error(comfy.run(graph))
    assert error["node_type"] == "BlipDiffusionSampler"
    assert "positive" in error["exception_message"] and "3 latents" in error["exception_message"]


def test_fused_conditioning_with_stock_nodes(comfy, tiny_model):
    """The fused CONDITIONING is native: stock KSampler, ConditioningSetTimestepRange and ConditioningCombine."""
    graph = zero_shot(tiny_model, prefix="stock")
    graph.add("CLIPTextEncode", "12", clip=["1", 1], text="a cat swimming underwater")
    graph.add("ConditioningSetTimestepRange", "13", conditioning=["4", 0], start=0.0, end=0.5)
    graph.add("ConditioningSetTimestepRange", "14", conditioning=["12", 0], start=0.5, end=1.0)
    graph.add("ConditioningCombine", "15", conditioning_1=["13", 0], conditioning_2=["14", 0])
    graph.add(
        "KSampler",
        "7",
        model=["1", 0],
        positive=["15", 0],
        negative=["5", 0],
        latent_image=["6", 0],
        seed=3,
        steps=3,
        cfg=7.5,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    assert comfy.image(comfy.run_ok(graph), "9").shape == (128, 128, 3)


def latent_of(comfy, graph: dict, name: str) -> torch.Tensor:
    comfy.run_ok(probe(graph, "20", name, latent=["7", 0]))
    return comfy.probe(name)[0]["latent"]


def test_plms_as_a_sampler_for_sampler_custom(comfy, tiny_model):
    """BLIP-Diffusion PLMS Sampler + Reference Sigmas in stock SamplerCustom = BlipDiffusionSampler."""
    reference = latent_of(comfy, zero_shot(tiny_model, seed=5, prefix="plms_a"), "plms_a")
    graph = zero_shot(tiny_model, seed=5, prefix="plms_b")
    graph.add("BlipDiffusionPLMSSampler", "16")
    graph.add("BlipDiffusionReferenceSigmas", "17", steps=3, denoise=1.0)
    graph.add(
        "SamplerCustom",
        "7",
        model=["1", 0],
        add_noise=True,
        noise_seed=5,
        cfg=7.5,
        positive=["4", 0],
        negative=["5", 0],
        sampler=["16", 0],
        sigmas=["17", 0],
        latent_image=["6", 0],
    )
    assert torch.equal(latent_of(comfy, graph, "plms_b"), reference)


def test_batch_noise_mask_and_denoise(comfy, tiny_model):
    """Two latents, an inpainting noise mask and img2img strength all run on the reference sampler."""
    graph = zero_shot(tiny_model, batch=2, prefix="masked")
    graph.add("SolidMask", "18", value=1.0, width=64, height=128)
    graph.add("SetLatentNoiseMask", "19", samples=["6", 0], mask=["18", 0])
    graph["7"]["inputs"].update(latent_image=["19", 0], denoise=0.6)
    assert len(comfy.run_ok(graph)["outputs"]["9"]["images"]) == 2


def test_empty_prompt_means_just_the_subject(comfy, tiny_model, text_encoder):
    """An empty prompt is allowed: the text becomes "a cat", repeated."""
    graph = probe(zero_shot(tiny_model, prompt=""), "20", "empty_prompt", conditioning=["4", 0], subject=["3", 0])
    comfy.run_ok(graph)
    tensors, _ = comfy.probe("empty_prompt")
    expected = text_encoder.encode([build_prompt("", "cat")], ctx=tensors["subject"])
    assert build_prompt("", "cat").startswith("a cat , a cat")
    assert (tensors["cond0"] - expected).abs().max().item() <= 1e-5


def test_empty_subject_is_rejected_before_queueing(comfy, tiny_model):
    status, body = comfy.submit(zero_shot(tiny_model, subject="  "))
    assert status == 400
    errors = body["node_errors"]["3"]["errors"]
    assert "category is empty" in errors[0]["details"]


@pytest.fixture(scope="module")
def micro_encoder(comfy_base) -> str:
    make_model(comfy_base / "models" / "blip_diffusion" / "micro", size="micro")
    return "micro"


def test_subject_from_another_model_width_is_a_clear_error(comfy, tiny_model, micro_encoder):
    graph = zero_shot(tiny_model)
    graph.add("BlipDiffusionSubjectEncoderLoader", "21", model_name=micro_encoder, weight_dtype="fp32")
    graph["3"]["inputs"]["subject_encoder"] = ["21", 0]
    error = execution_error(comfy.run(graph))
    assert error["node_type"] == "BlipDiffusionMultimodalPromptFuse"
    assert "32 wide" in error["exception_message"] and "768" in error["exception_message"]


# --- parity with the real diffusers pipeline ---------------------------------------------------


@pytest.mark.reference
def test_end_to_end_parity_with_diffusers(comfy, comfy_base, tiny_model, model_dir, reference):
    """The same weights, photo, prompt and seed through ComfyUI and through BlipDiffusionPipeline."""
    settings = dict(prompt="swimming underwater", negative=NEGATIVE, seed=7, steps=3, size=128)
    ref = reference(
        "run_pipeline.py",
        model=str(model_dir),
        image=str(comfy_base / "input" / "blipd_example_cat.jpg"),
        subject="cat",
        target="cat",
        prompt=settings["prompt"],
        negative=settings["negative"],
        seed=settings["seed"],
        steps=settings["steps"],
        guidance=7.5,
        height=128,
        width=128,
        strength=1.0,
        reps=20,
        control_image=None,
    )
    graph = zero_shot(tiny_model, prefix="parity", **settings)
    probe(graph, "20", "parity_pos", conditioning=["4", 0])
    probe(graph, "21", "parity_neg", conditioning=["5", 0])
    probe(graph, "22", "parity_latent", latent=["7", 0])
    entry = comfy.run_ok(graph)
    # stages, for the diagnosis when the image differs
    assert np.abs(comfy.probe("parity_pos")[0]["cond0"].numpy() - ref["cond"]).max() <= 1e-4
    assert np.abs(comfy.probe("parity_neg")[0]["cond0"].numpy() - ref["uncond"]).max() <= 1e-4
    latent = comfy.probe("parity_latent")[0]["latent"].numpy()
    assert np.abs(latent - ref["latents_final"]).max() <= 1e-3 * np.abs(ref["latents_final"]).max()
    # the picture: ComfyUI's SaveImage truncates to 8 bits; truncate the reference the same way
    ours = comfy.image(entry, "9").astype(np.float64)
    theirs = np.clip(ref["image"] * 255, 0, 255).astype(np.uint8).astype(np.float64)
    diff = np.abs(ours - theirs)
    print(f"e2e parity: mean |d| = {diff.mean():.4f}/255, max |d| = {diff.max():.0f}/255")
    assert diff.mean() <= 2.0
