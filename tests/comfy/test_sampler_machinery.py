"""The sampler on ComfyUI's machinery: progress events, latent previews, cancel, through the websocket."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp

from blip_diffusion_nodes.tests.graphs import inversion, zero_shot


async def watch(comfy, prompt: dict, interrupt_at_step: int | None = None) -> dict:
    """Run `prompt`, collecting websocket events until it finishes; optionally press Cancel mid-sampling."""
    client_id = str(uuid.uuid4())
    seen = {"progress": [], "previews": 0, "end": None}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{comfy.url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
            status, body = await asyncio.to_thread(comfy.submit, prompt, client_id)
            assert status == 200, body
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY:
                    seen["previews"] += 1
                    continue
                event = json.loads(message.data)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, body["prompt_id"]):
                    continue
                if event["type"] == "progress":
                    seen["progress"].append((data["node"], data["value"], data["max"]))
                    if interrupt_at_step is not None and data["node"] == "7" and data["value"] >= interrupt_at_step:
                        await asyncio.to_thread(comfy.request, "POST", "/interrupt", {})
                        interrupt_at_step = None
                if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    seen["end"] = event["type"]
                    break
    return seen


def test_progress_and_previews(comfy, tiny_model):
    seen = asyncio.run(watch(comfy, zero_shot(tiny_model, steps=4, seed=11, prefix="previews")))
    assert seen["end"] == "execution_success"
    sampler_steps = [(value, total) for node, value, total in seen["progress"] if node == "7"]
    assert sampler_steps and sampler_steps[-1] == (4, 4)
    assert seen["previews"] >= 1  # latent2rgb previews stream while sampling


def test_cancel_mid_sampling_then_the_next_prompt_runs(comfy, tiny_model):
    seen = asyncio.run(
        watch(comfy, zero_shot(tiny_model, size=256, steps=40, seed=12, prefix="cancelled"), interrupt_at_step=2)
    )
    assert seen["end"] == "execution_interrupted"
    steps = [value for node, value, _ in seen["progress"] if node == "7"]
    assert max(steps) < 40
    assert comfy.run_ok(zero_shot(tiny_model, seed=13, prefix="after_cancel"))["outputs"]["9"]["images"]


def test_inversion_reports_progress_and_previews(comfy, tiny_model):
    """DDIM inversion runs on ComfyUI's sampling machinery too: a progress bar per step and latent previews."""
    graph = inversion(tiny_model, "blipd_example_cat.jpg", steps=4, prefix="inversion_progress")
    graph.add(
        "ImageScale",
        "2",
        image=graph.add("LoadImage", "12", image="blipd_example_cat.jpg"),
        upscale_method="bicubic",
        width=64,
        height=64,
        crop="center",
    )
    seen = asyncio.run(watch(comfy, graph))
    assert seen["end"] == "execution_success"
    inversion_steps = [(value, total) for node, value, total in seen["progress"] if node == "6"]
    assert inversion_steps and inversion_steps[-1] == (4, 4)
    assert seen["previews"] >= 2  # the inversion's and the sampler's
