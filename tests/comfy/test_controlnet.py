"""ControlNet in a real ComfyUI: loader, apply (strength, start/end, chains, hint policy, bad input),
canny and HED preprocessors, the example workflows, and parity with the real diffusers
BlipDiffusionControlNetPipeline (run in the reference venv).

The generated tiny model is small enough for the CPU at 96x64 and 3 steps; its ControlNet is
random, so "control has an effect" means the output differs, not that it follows the edges.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from blip_diffusion_nodes.tests.graphs import Graph, edges, previewed, probe, shrink, twin, zero_shot
from blip_diffusion_nodes.tools.comfy_server import execution_error
from blip_diffusion_nodes.tools.make_tiny_model import controlnet_config, diffusers_shapes, state_dict

ROOT = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT, STEPS, SEED, CFG = 96, 64, 3, 7, 7.5
SUBJECT, CATEGORY, TARGET, PROMPT = "blipd_example_cat.jpg", "cat", "teapot", "on a marble table"
NEGATIVE = "lowres, blurry, worst quality"
SOURCE_PHOTO = "blipd_example_cup.jpg"


def control_pixels(height: int, width: int) -> np.ndarray:
    """A deterministic edge-map-like picture: white outlines on black."""
    y, x = np.mgrid[:height, :width]
    ring = np.abs(np.hypot(y - height * 0.5, x - width * 0.4) - min(height, width) * 0.3) < 1.5
    box = ((np.abs(x - width * 0.75) < 1) | (np.abs(y - height * 0.3) < 1)) & (x > width * 0.5)
    return np.repeat(((ring | box) * 255).astype(np.uint8)[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def control_image(comfy) -> str:
    """Another size and aspect than the output (70x100 vs 64x96): exercises the bicubic hint policy."""
    return comfy.put_input("blipd_test_control.png", control_pixels(70, 100))


@pytest.fixture(scope="module")
def control_image_at_size(comfy) -> str:
    """Already the output size: every hint policy leaves it unchanged."""
    return comfy.put_input("blipd_test_control_96x64.png", control_pixels(HEIGHT, WIDTH))


LOADED = (None, 0)  # apply(image=LOADED): the graph's LoadImage of control_image


def apply(image, strength=1.0, start=0.0, end=1.0, control_net=("cn", 0), node="BlipDiffusionControlNetApply") -> dict:
    """An apply node spec for generation(); it wires positive and negative."""
    return {
        "class_type": node,
        "inputs": {
            "control_net": list(control_net),
            "image": list(image),
            "strength": strength,
            "start_percent": start,
            "end_percent": end,
        },
    }


def generation(
    model: str,
    controls=(),
    control_image: str | None = None,
    controlnet: str | None = None,
    batch: int = 1,
    steps: int = STEPS,
    prefix: str = "t_cn",
    residuals: str | None = None,
) -> Graph:
    """The stylization graph: subject -> fused prompt, negative, ControlNet applies in a chain, sampler, decode.

    `controls` are apply() node specs wired in order: their positive/negative inputs are replaced
    by the previous stage; an image of None means the LoadImage of `control_image`.
    """
    g = zero_shot(
        model,
        image=SUBJECT,
        subject=CATEGORY,
        prompt=PROMPT,
        target=TARGET,
        negative=NEGATIVE,
        size=WIDTH,
        height=HEIGHT,
        steps=steps,
        seed=SEED,
        cfg=CFG,
        batch=batch,
        prefix=prefix,
    )
    if controls:
        g.add("BlipDiffusionControlNetLoader", "cn", model_name=controlnet or model)
    if control_image is not None:
        g.add("LoadImage", "ci", image=control_image)
    positive, negative = ["4", 0], ["5", 0]
    for i, spec in enumerate(controls):
        inputs = json.loads(json.dumps(spec["inputs"]))
        if inputs["image"] == [None, 0]:
            inputs["image"] = ["ci", 0]
        g.add(spec["class_type"], f"a{i}", **inputs, positive=positive, negative=negative)
        positive, negative = [f"a{i}", 0], [f"a{i}", 1]
    g["7"]["inputs"].update(positive=positive, negative=negative)
    if residuals:
        g["7"]["inputs"]["model"] = g.add("ProbeControlResiduals", "r", model=["1", 0], name=residuals)
    return g


def images(comfy, entry, node="9") -> np.ndarray:
    return np.stack([comfy.image(entry, node, i) for i in range(len(entry["outputs"][node]["images"]))]).astype(
        np.int16
    )


def run_images(comfy, graph) -> np.ndarray:
    return images(comfy, comfy.run_ok(graph))


# --- contract ----------------------------------------------------------------------------------


def test_contract_inputs_and_defaults(comfy):
    info = comfy.get_json("/object_info")

    def spec(node, name):
        inputs = info[node]["input"]
        return {**inputs["required"], **inputs.get("optional", {})}[name]

    assert info["BlipDiffusionControlNetApply"]["input_order"]["required"] == [
        "positive",
        "negative",
        "control_net",
        "image",
        "strength",
        "start_percent",
        "end_percent",
    ]
    assert list(info["BlipDiffusionControlNetApply"]["input"]["optional"]) == ["vae"]
    assert info["BlipDiffusionControlNetApply"]["output"] == ["CONDITIONING", "CONDITIONING"]
    assert [
        spec("BlipDiffusionControlNetApply", n)[1]["default"] for n in ("strength", "start_percent", "end_percent")
    ] == [1.0, 0.0, 1.0]
    assert info["BlipDiffusionControlNetLoader"]["output"] == ["CONTROL_NET"]
    assert [
        spec("BlipDiffusionCannyEdges", n)[1]["default"] for n in ("low_threshold", "high_threshold", "resolution")
    ] == [30, 70, 512]
    assert info["BlipDiffusionHEDEdges"]["input_order"]["required"] == [
        "image",
        "annotator",
        "scribble",
        "safe",
        "resolution",
    ]


def test_loader_lists_release_folder_and_controlnet_files(comfy, comfy_base, tiny_model):
    (comfy_base / "models" / "controlnet").mkdir(parents=True, exist_ok=True)
    (comfy_base / "models" / "controlnet" / "listed.safetensors").write_bytes(b"")
    options = comfy.get_json("/object_info/BlipDiffusionControlNetLoader")["BlipDiffusionControlNetLoader"]["input"][
        "required"
    ]["model_name"][1]["options"]
    assert tiny_model in options and "listed.safetensors" in options
    (comfy_base / "models" / "controlnet" / "listed.safetensors").unlink()


# --- parity with the real reference ------------------------------------------------------------


def reference_request(comfy, model: str, control_image: str, **extra) -> dict:
    return {
        "model": str(comfy.base / "models" / "blip_diffusion" / model),
        "image": str(comfy.base / "input" / SUBJECT),
        "subject": CATEGORY,
        "target": TARGET,
        "prompt": PROMPT,
        "negative": NEGATIVE,
        "seed": SEED,
        "steps": STEPS,
        "guidance": CFG,
        "height": HEIGHT,
        "width": WIDTH,
        "strength": 1.0,
        "reps": 20,
        "control_image": str(comfy.base / "input" / control_image),
        **extra,
    }


def compare_residuals(comfy, name: str, ref) -> float:
    """max |pack - reference| over the step-0 residuals of both CFG halves (reference order: uncond, cond)."""
    ours, _ = comfy.probe(name)
    downs = sorted(k for k in ref if k.startswith("control0_down"))
    assert len(downs) == len([k for k in ours if k.startswith("cond_down")]) > 0
    worst = 0.0
    for key in [*downs, "control0_mid"]:
        part = key.removeprefix("control0_")
        pack = torch.cat([ours[f"uncond_{part}"], ours[f"cond_{part}"]]).numpy()
        assert pack.shape == ref[key].shape, key
        worst = max(worst, float(np.abs(pack - ref[key]).max()))
    return worst


def compare_images(pack: np.ndarray, ref) -> tuple[float, float]:
    reference = np.round(np.clip(ref["image"], 0, 1) * 255)
    diff = np.abs(pack[0].astype(np.float64) - reference)
    return diff.mean(), diff.max()


@pytest.fixture(scope="module")
def reference_defaults(comfy, tiny_model, control_image, reference):
    """The real pipeline at its defaults on the tiny model, with the 70x100 control image."""
    return reference("run_pipeline.py", **reference_request(comfy, tiny_model, control_image))


@pytest.mark.reference
def test_parity_with_reference_pipeline(comfy, tiny_model, control_image, reference_defaults):
    """Defaults (strength 1, the whole schedule) and a control image of another size and aspect:
    the step-0 residuals of both CFG halves and the final image match the real pipeline."""
    pack = run_images(comfy, generation(tiny_model, [apply(LOADED)], control_image, residuals="cn_parity"))
    residual = compare_residuals(comfy, "cn_parity", reference_defaults)
    mean, worst = compare_images(pack, reference_defaults)
    print(f"\nparity defaults: residuals max|d|={residual:.2e}, image mean|d|={mean:.3f}/255 max|d|={worst:.0f}/255")
    assert residual <= 1e-4
    assert mean <= 2.0 and worst <= 16


@pytest.mark.reference
def test_comfy_hint_resize_would_not_match(comfy, tiny_model, control_image, reference_defaults):
    """Why the apply node resizes hints itself: ComfyUI's own Apply ControlNet, same image and
    settings, crops and resizes nearest-exact, and its residuals miss the reference by far more."""
    graph = generation(
        tiny_model,
        [apply(LOADED, node="ControlNetApplyAdvanced")],
        control_image,
        residuals="cn_stock",
        prefix="t_cn_stock",
    )
    comfy.run_ok(graph)
    residual = compare_residuals(comfy, "cn_stock", reference_defaults)
    print(f"\nComfyUI's nearest-exact crop: residuals max|d|={residual:.2e}")
    assert residual > 1e-2


@pytest.mark.reference
def test_strength_and_window_match_scaled_reference(comfy, tiny_model, control_image, reference):
    """strength 0.6 with end_percent 0.5 = the reference's residuals times 0.6 in the calls before the
    middle of the schedule and 0 after: with 3 steps the reference calls the model at t = 666, 333,
    333, 0, and end_percent 0.5 is t = 499.5."""
    graph = generation(
        tiny_model, [apply(LOADED, strength=0.6, end=0.5)], control_image, residuals="cn_window", prefix="t_cn_window"
    )
    pack = run_images(comfy, graph)
    ref = reference(
        "run_pipeline.py", **reference_request(comfy, tiny_model, control_image, control_scales=[0.6, 0.0, 0.0, 0.0])
    )
    residual = compare_residuals(comfy, "cn_window", ref)
    mean, worst = compare_images(pack, ref)
    print(
        f"\nparity strength/window: residuals max|d|={residual:.2e}, image mean|d|={mean:.3f}/255 "
        f"max|d|={worst:.0f}/255"
    )
    assert residual <= 1e-4
    assert mean <= 2.0 and worst <= 16


# --- strength, windows, chains ------------------------------------------------------------------


def test_strength_zero_is_the_zero_shot_output(comfy, tiny_model, control_image):
    uncontrolled = run_images(comfy, generation(tiny_model))
    assert np.array_equal(
        run_images(comfy, generation(tiny_model, [apply(LOADED, strength=0.0)], control_image)), uncontrolled
    )
    controlled = run_images(comfy, generation(tiny_model, [apply(LOADED)], control_image))
    assert np.abs(controlled - uncontrolled).mean() > 1.0  # the ControlNet does act


def test_window_outside_the_schedule_is_no_control(comfy, tiny_model, control_image):
    """start_percent 0.9: the 3-step schedule's calls all lie before it (t = 666, 333, 333 > t(0.9) = 100)."""
    uncontrolled = run_images(comfy, generation(tiny_model))
    late = run_images(comfy, generation(tiny_model, [apply(LOADED, start=0.9)], control_image))
    assert np.array_equal(late, uncontrolled)


def probe_chain(comfy, graph: Graph, name: str):
    last = max(k for k in graph if k.startswith("a"))
    keep = Graph({k: v for k, v in graph.items() if k not in ("7", "8", "9")})
    comfy.run_ok(probe(keep, "p", name, conditioning=[last, 0]))
    return comfy.probe(name)


def test_two_controlnet_chain_adds_residuals(comfy, tiny_model, control_image_at_size):
    """Two ControlNets at 0.5 (this pack's, then ComfyUI's) = one at 1.0: residuals add up, and with a
    control image at the output size both hint policies give the same hint."""
    halves = [
        apply(LOADED, strength=0.5, end=0.8),
        apply(LOADED, strength=0.5, end=0.8, node="ControlNetApplyAdvanced"),
    ]
    chained = generation(tiny_model, halves, control_image_at_size, steps=2)
    tensors, meta = probe_chain(comfy, chained, "cn_chain")
    assert meta["control0"] == "[(0.5, 0.0, 0.8), (0.5, 0.0, 0.8)]"  # newest first
    assert torch.equal(tensors["hint0_0"], tensors["hint0_1"])
    one = run_images(comfy, generation(tiny_model, [apply(LOADED, end=0.8)], control_image_at_size, steps=2))
    assert np.array_equal(run_images(comfy, chained), one)
    half = run_images(comfy, generation(tiny_model, halves[:1], control_image_at_size, steps=2))
    assert np.abs(half - one).mean() > 1.0


def test_chain_after_stock_apply_and_with_itself(comfy, tiny_model, control_image):
    graph = generation(
        tiny_model,
        [
            apply(LOADED, node="ControlNetApplyAdvanced", strength=0.3),
            apply(LOADED, strength=0.7, start=0.1, end=0.9),
            apply(LOADED, strength=1.2, start=0.2),
        ],
        control_image,
    )
    tensors, meta = probe_chain(comfy, graph, "cn_chain3")
    assert meta["control0"] == "[(1.2, 0.2, 1.0), (0.7, 0.1, 0.9), (0.3, 0.0, 1.0)]"
    assert tensors["hint0_0"].shape == (1, 3, 70, 100)  # attached as given; resized at sampling time
    comfy.run_ok(graph)


# --- hint images: batch, channels --------------------------------------------------------------


def batch_of_two(graph: Graph) -> Graph:
    """The control image and its inverse as a batch of 2."""
    inverse = graph.add("ImageInvert", "inv", image=["ci", 0])
    graph["a0"]["inputs"]["image"] = graph.add("ImageBatch", "two", image1=["ci", 0], image2=inverse)
    return graph


def test_control_batch_must_be_one_or_one_per_latent(comfy, tiny_model, control_image):
    entry = comfy.run(batch_of_two(generation(tiny_model, [apply(LOADED)], control_image, batch=3, steps=2)))
    error = execution_error(entry)
    assert error, "a batch of 2 control images for 3 latents must fail"
    assert "BlipDiffusionControlNetApply" in error["exception_message"]
    assert "batch of 2 control images" in error["exception_message"] and "3 latents" in error["exception_message"]


def test_one_control_image_per_latent(comfy, tiny_model, control_image):
    per_latent = run_images(
        comfy, batch_of_two(generation(tiny_model, [apply(LOADED)], control_image, batch=2, steps=2))
    )
    shared = run_images(comfy, generation(tiny_model, [apply(LOADED)], control_image, batch=2, steps=2))
    assert np.array_equal(per_latent[0], shared[0])  # latent 0 got the control image in both runs
    assert np.abs(per_latent[1] - shared[1]).mean() > 1.0  # latent 1 got its inverse


@pytest.mark.parametrize("mode", ["gray", "rgba"])
def test_gray_and_rgba_control_images(comfy, tiny_model, control_image, mode):
    """Documented: gray is repeated to RGB, alpha is dropped (the reference's convert("RGB"))."""
    graph = generation(tiny_model, [apply(LOADED)], control_image)
    graph["a0"]["inputs"]["image"] = graph.add("ProbeImageChannels", "ch", image=["ci", 0], mode=mode)
    tensors, _ = probe_chain(comfy, graph, f"cn_{mode}")
    pixels = torch.from_numpy(control_pixels(70, 100)).float().div(255).movedim(-1, 0)[None]
    expected = pixels[:, :1].expand(-1, 3, -1, -1) if mode == "gray" else pixels
    assert torch.equal(tensors["hint0_0"], expected)


def test_controlnet_of_another_architecture_is_refused(comfy, comfy_base, tiny_model, control_image):
    """A ControlNet that cross-attends to 2048-wide embeddings (SDXL's width), loaded by this pack's loader."""
    folder = comfy_base / "models" / "controlnet" / "wide_context"
    config = {**controlnet_config("tiny"), "cross_attention_dim": 2048}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(
        state_dict(diffusers_shapes(config), 1, torch.float16, "controlnet"),
        str(folder / "diffusion_pytorch_model.safetensors"),
    )
    graph = generation(
        tiny_model,
        [apply(LOADED)],
        control_image,
        steps=2,
        controlnet="wide_context/diffusion_pytorch_model.safetensors",
    )
    error = execution_error(comfy.run(graph))
    assert error and error["node_type"] == "BlipDiffusionControlNetApply"
    assert "2048" in error["exception_message"] and "768" in error["exception_message"]


# --- loader: formats and errors ----------------------------------------------------------------


def test_loader_formats_give_the_same_controlnet(comfy, comfy_base, tiny_model, control_image_at_size):
    """The release folder (.safetensors and pickle .bin), a diffusers folder in models/controlnet, and
    ComfyUI's single-file format (read by this loader and by ComfyUI's) load identical ControlNets."""
    models = comfy_base / "models"
    release = models / "blip_diffusion" / tiny_model
    as_bin = models / "blip_diffusion" / "blipd_cn_bin"
    as_bin.mkdir(exist_ok=True)
    for item in release.iterdir():
        if item.name != "controlnet" and not (as_bin / item.name).exists():
            (as_bin / item.name).symlink_to(item)
    (as_bin / "controlnet").mkdir(exist_ok=True)
    shutil.copy(release / "controlnet" / "config.json", as_bin / "controlnet" / "config.json")
    tensors = load_file(str(release / "controlnet" / "diffusion_pytorch_model.safetensors"))
    torch.save(tensors, as_bin / "controlnet" / "diffusion_pytorch_model.bin")
    saved = Graph()
    saved.add(
        "ProbeSaveControlNet",
        control_net=saved.add("BlipDiffusionControlNetLoader", model_name=tiny_model),
        filename="blipd_cn_ldm.safetensors",
    )
    comfy.run_ok(saved)

    def image(controlnet, loader="BlipDiffusionControlNetLoader"):
        graph = generation(tiny_model, [apply(LOADED)], control_image_at_size, controlnet=controlnet, steps=2)
        if loader != "BlipDiffusionControlNetLoader":
            graph.add(loader, "cn", control_net_name=controlnet)
        return run_images(comfy, graph)

    expected = image(tiny_model)
    for name in (
        "blipd_cn_bin",
        "sd-controlnet-scribble/diffusion_pytorch_model.safetensors",
        "blipd_cn_ldm.safetensors",
    ):
        assert np.array_equal(image(name), expected), name
    assert np.array_equal(image("blipd_cn_ldm.safetensors", loader="ControlNetLoader"), expected)


def test_release_folder_without_controlnet_weights(comfy, comfy_base, tiny_model):
    folder = comfy_base / "models" / "blip_diffusion" / "blipd_cn_missing"
    (folder / "controlnet").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text("{}")
    shutil.copy(
        comfy_base / "models" / "blip_diffusion" / tiny_model / "controlnet" / "config.json",
        folder / "controlnet" / "config.json",
    )
    entry = comfy.run(previewed("BlipDiffusionControlNetLoader", model_name="blipd_cn_missing"))
    error = execution_error(entry)
    assert error and error["node_type"] == "BlipDiffusionControlNetLoader"
    assert "controlnet/" in error["exception_message"] and "diffusion_pytorch_model" in error["exception_message"]


# --- preprocessors -----------------------------------------------------------------------------


def run_preprocessor(comfy, node: str, **inputs) -> np.ndarray:
    return comfy.image(comfy.run_ok(edges(node, SOURCE_PHOTO, prefix=f"t_{node}", **inputs)), "3")


def photo(comfy) -> np.ndarray:
    return np.asarray(Image.open(comfy.base / "input" / SOURCE_PHOTO).convert("RGB"))


def test_canny_is_controlnet_aux_canny(comfy):
    from controlnet_aux.canny import CannyDetector

    edges = run_preprocessor(comfy, "BlipDiffusionCannyEdges", low_threshold=30, high_threshold=70, resolution=128)
    assert edges.shape == (128, 192, 3)  # 400x600 photo: short side to 128
    assert np.array_equal(edges, CannyDetector()(photo(comfy), 30, 70, detect_resolution=128, image_resolution=128))
    assert 0.01 < (edges > 0).mean() < 0.5


@pytest.mark.parametrize("scribble,safe", [(False, False), (True, True)])
def test_hed_is_controlnet_aux_hed_with_local_weights(comfy, hed_annotator, scribble, safe):
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    edges = run_preprocessor(
        comfy, "BlipDiffusionHEDEdges", annotator=hed_annotator, scribble=scribble, safe=safe, resolution=128
    )
    network = ControlNetHED_Apache2()
    network.load_state_dict(
        torch.load(comfy.base / "models" / "annotators" / hed_annotator / "ControlNetHED.pth", weights_only=True)
    )
    expected = HEDdetector(network.float().eval())(
        photo(comfy), detect_resolution=128, image_resolution=128, safe=safe, scribble=scribble, output_type="np"
    )
    assert edges.shape == expected.shape == (128, 192, 3)
    assert np.abs(edges.astype(int) - expected).max() <= 1  # thread counts may round a value differently
    levels = len(np.unique(edges))
    assert levels == 2 if scribble else levels > 50


def test_hed_without_annotator_file_names_file_and_folder(comfy, comfy_base):
    (comfy_base / "models" / "annotators" / "no_weights").mkdir(parents=True, exist_ok=True)
    for name, expected in (("no_weights", "ControlNetHED.pth"), ("nowhere", "not found"), ("../input", "not a path")):
        status, body = comfy.submit(
            edges("BlipDiffusionHEDEdges", SOURCE_PHOTO, annotator=name, scribble=False, safe=False, resolution=128)
        )
        assert status == 400, body
        message = json.dumps(body["node_errors"])
        assert expected in message and "annotators" in message, message
        if name == "no_weights":
            assert str(comfy_base / "models" / "annotators" / "no_weights") in message


# --- the example workflows ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["controlnet_canny_stylization", "controlnet_scribble", "controlnet_multi"])
def test_workflow_runs(comfy, name):
    """The API twin as shipped, made small for the CPU (64x64, 2 steps, preprocessors at 128)."""
    prompt = shrink(twin(name), size=64, steps=2)
    for node in prompt.values():
        if node["class_type"] in ("BlipDiffusionCannyEdges", "BlipDiffusionHEDEdges"):
            node["inputs"].update(resolution=128)
    entry = comfy.run_ok(prompt)
    save = next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
    assert comfy.image(entry, save).shape == (64, 64, 3)
