"""Subject-driven editing through the real server: the pack's graphs against what the original LAVIS code computed
(Level 2, tests/fixtures/editing_lavis.npz, on the `edit` model at 512x512), the edit's rows against plain
generations (Level 3), ComfyUI's samplers, and the bad inputs of docs/reliability.md's editing section."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from blip_diffusion_nodes.blip_core.sampling import DDIM_OFFSET, reference_sigmas
from blip_diffusion_nodes.blip_core.subject import Subject
from blip_diffusion_nodes.blip_core.subject_file import save_subject
from blip_diffusion_nodes.tests.comfy.reliability import covers, failed, healthy, memory_guard, rejected
from blip_diffusion_nodes.tests.comfy.test_reliability import run_and_interrupt
from blip_diffusion_nodes.tests.graphs import Graph, edit, inversion, probe, shrink, twin
from blip_diffusion_nodes.tools.comfy_server import ComfyServer, prepare_base
from blip_diffusion_nodes.tools.make_tiny_model import make_model, weights_digest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "editing_lavis.npz"
EDIT_MODEL = "blipdiffusion-edit"  # tools/make_tiny_model.py --size edit, in the server's models/blip_diffusion
SCALE = 0.18215
MARGIN = 1e-4  # no LocalBlend map value this close to the threshold (rounding could flip the mask)


@pytest.fixture(scope="module")
def fx():
    arrays = np.load(FIXTURE)
    return arrays, json.loads(arrays["meta"].tobytes())


@pytest.fixture(scope="module")
def edit_model(comfy, comfy_base, fx) -> str:
    """The weights LAVIS ran on, regenerated bit for bit (1.2 GB on disk), removed after the module."""
    import shutil

    folder = make_model(comfy_base / "models" / "blip_diffusion" / EDIT_MODEL, size="edit")
    if weights_digest(folder) != fx[1]["digest"]:
        pytest.fail(
            "tests/fixtures/editing_lavis.npz was made from other weights than `make_tiny_model.py --size edit` "
            "writes now: regenerate it with tools/reference/lavis_editing.py (its docstring has the commands)"
        )
    yield EDIT_MODEL
    comfy.request("POST", "/free", {"unload_models": True, "free_memory": True})
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def l2_inputs(comfy, fx) -> dict[str, str]:
    """The fixture's subject vectors as a subject file, its start noise as a file, its photo as a PNG (input/)."""
    arrays, meta = fx
    embeds = torch.from_numpy(arrays["l2/subject_embeds"].astype(np.float32))
    save_subject(Subject(embeds, meta["level2"]["gen"]["cond_subject"]), comfy.base / "input" / "blipd_l2.safetensors")
    save_file(
        {"noise": torch.from_numpy(arrays["l2/gen/noise"])}, str(comfy.base / "input" / "blipd_l2_noise.safetensors")
    )
    return {
        "subject": "blipd_l2.safetensors [input]",
        "noise": "blipd_l2_noise.safetensors",
        "photo": comfy.put_input("blipd_l2_photo.png", arrays["l2/edit/photo"]),
    }


def l2_graph(model: str, inputs: dict, settings: dict, photo: bool) -> Graph:
    """The original's run as the pack's graph: edit() with the fixture's subject, prompts and settings, the
    LocalBlend maps probed (21). Generated: SamplerCustomAdvanced from the fixture's noise with the pack's PLMS
    (the BLIP-Diffusion Sampler draws its own noise from a seed). Real photo: edit()'s inversion path."""
    g = edit(
        model,
        photo=inputs["photo"] if photo else None,
        subject_file=inputs["subject"],
        source=settings["src_subject"],
        prompt=settings["prompt"],
        target=settings["tgt_subject"],
        negative=settings["negative_prompt"],
        size=settings["height"],
        steps=settings["steps"],
        cfg=settings["guidance_scale"],
        cross_replace=settings["cross_replace_steps"],
        self_replace=settings["self_replace_steps"],
        threshold=settings["blend_threshold"],
        prefix="edit_l2",
    )
    del g["9"], g["10"]  # latents are compared, not pictures (a 512x512 decode costs a minute here)
    name = "l2_photo" if photo else "l2_gen"
    g.add("ProbeEditMaps", "21", model=["6", 0], name=f"{name}_maps")
    g["8"]["inputs"]["model"] = ["21", 0]
    if not photo:
        g.add("CFGGuider", "22", model=["21", 0], positive=["4", 0], negative=["5", 0], cfg=settings["guidance_scale"])
        g.add(
            "SamplerCustomAdvanced",
            "8",
            noise=g.add("ProbeFileNoise", "23", file=inputs["noise"]),
            guider=["22", 0],
            sampler=g.add("BlipDiffusionPLMSSampler", "24"),
            sigmas=g.add("BlipDiffusionReferenceSigmas", "25", steps=settings["steps"], denoise=1.0, schedule="pndm"),
            latent_image=["7", 0],
        )
    probe(g, "26", f"{name}_final", latent=["8", 0])
    probe(g, "27", f"{name}_start", latent=["7", 0])
    if photo:
        probe(g, "28", f"{name}_photo", latent=["12", 0])
    return g


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.ptp(theirs))


def check_blend(maps: torch.Tensor, masks: np.ndarray, threshold: float, label: str) -> None:
    """Our LocalBlend maps: the original's masks exactly, and no value within MARGIN of the threshold."""
    margin = (maps.double() - threshold).abs().min().item()
    ours = (maps > threshold).numpy()
    print(f"{label}: {len(maps)} blends, mask shares {ours.mean(axis=(1, 2)).round(3).tolist()}, margin {margin:.1e}")
    assert margin > MARGIN
    assert maps.shape == masks.shape and np.array_equal(ours, masks.astype(bool))


@pytest.mark.slow
def test_level2_generate_then_edit_matches_lavis(comfy, edit_model, l2_inputs, fx):
    arrays, meta = fx
    settings = meta["level2"]["gen"]
    comfy.run_ok(l2_graph(edit_model, l2_inputs, settings, photo=False), timeout=1800)
    maps = comfy.probe("l2_gen_maps")[0]["maps"]
    check_blend(maps, arrays["l2/gen/masks"], settings["blend_threshold"], "generate then edit")
    final, expected = comfy.probe("l2_gen_final")[0]["latent"].numpy(), arrays["l2/gen/final_latent"]
    errors = [relative_error(final[row], expected[row]) for row in range(2)]
    print(f"generate then edit, final latents max|d| / range: source {errors[0]:.1e}, target {errors[1]:.1e}")
    assert max(errors) <= 1e-3


@pytest.mark.slow
def test_level2_real_photo_edit_matches_lavis(comfy, edit_model, l2_inputs, fx):
    arrays, meta = fx
    settings = meta["level2"]["edit"]
    comfy.run_ok(l2_graph(edit_model, l2_inputs, settings, photo=True), timeout=1800)
    z0 = comfy.probe("l2_photo_photo")[0]["latent"].numpy() * SCALE
    sigma = reference_sigmas(settings["inversion_steps"], DDIM_OFFSET)[0].double()
    inverted = comfy.probe("l2_photo_start")[0]["latent"].double() * SCALE / (1 + sigma**2).sqrt()  # as LAVIS's z
    z0_err = relative_error(z0, arrays["l2/edit/z0"])
    inverted_err = relative_error(inverted.numpy(), arrays["l2/edit/inverted_z"])
    maps = comfy.probe("l2_photo_maps")[0]["maps"]
    check_blend(maps, arrays["l2/edit/masks"], settings["blend_threshold"], "real-photo edit")
    final, expected = comfy.probe("l2_photo_final")[0]["latent"].numpy(), arrays["l2/edit/final_latent"]
    errors = [relative_error(final[row], expected[row]) for row in range(2)]
    print(
        f"real-photo edit, max|d| / range: photo latent {z0_err:.1e}, inverted {inverted_err:.1e}, final "
        f"source {errors[0]:.1e}, target {errors[1]:.1e}"
    )
    # The photo's latent comes from ComfyUI's own VAE code, LAVIS's from diffusers' AutoencoderKL: at 512x512 their
    # fp32 rounding differs by 1.5e-4 of the range (1e-4 at 64x64, tests/comfy/test_inversion.py).
    assert z0_err <= 1e-3 and inverted_err <= 1e-3
    assert max(errors) <= 1e-3


# --- Level 3: the rows against plain generations (the tiny model, 64x64) ----------------------------------

SOURCE_PROMPT = "a dog on the grass"
TARGET_TEXT = " ".join(
    ["sks"] * 16 + ["cat"]
)  # the lavis target "a sks x16 cat on the grass" for the Multimodal Prompt
APPROXIMATION = "LocalBlend is applied to each step's x0 prediction instead: an approximation"


def sample(g: Graph, model: list, positive: list, latent: list, seed: int, sampler: str, steps: int = 4) -> None:
    """Node 8: the BLIP-Diffusion Sampler (pndm, reference_ddim) or a stock KSampler (euler ...), scheduler as fits."""
    common = dict(
        model=model, positive=positive, negative=["5", 0], latent_image=latent, seed=seed, steps=steps, cfg=7.5
    )
    if sampler in ("pndm", "reference_ddim"):
        g.add("BlipDiffusionSampler", "8", **common, sampler_name=sampler, scheduler="reference", denoise=1.0)
    else:
        g.add("KSampler", "8", **common, sampler_name=sampler, scheduler="normal", denoise=1.0)


def plain(model: str, seed: int = 0, sampler: str = "pndm", rows: str = "source", steps: int = 4) -> Graph:
    """A plain generation (the unpatched MODEL) with the edit graph's negative, size and settings, of `rows`:
    "source" (CLIPTextEncode of the source prompt, 14), "target" (the Multimodal Prompt of the same target text
    as the edit's, 15), or "both": the two in one batch of two rows from the same noise (the edit's batch layout:
    the CPU's kernels round a batch of 4 UNet rows and one of 2 slightly differently)."""
    g = edit(model, seed=seed, steps=steps, prefix="edit_plain")
    for node in ("4", "6", "7", "8", "9", "10"):
        del g[node]
    g.add("CLIPTextEncode", "14", clip=["1", 1], text=SOURCE_PROMPT)
    g.add(
        "BlipDiffusionMultimodalPromptFuse",
        "15",
        clip=["1", 1],
        subject=["3", 0],
        prompt="on the grass",
        target_subject=TARGET_TEXT,
        prompt_strength=1.0,
        prompt_reps=1,
        multi_image="average",
    )
    positive = {"source": ["14", 0], "target": ["15", 0]}.get(rows) or g.add(
        "ProbeStackConditioning", "16", first=["14", 0], second=["15", 0]
    )
    latent = g.add("EmptyLatentImage", "7", width=64, height=64, batch_size=2 if rows == "both" else 1)
    if rows == "both":
        latent = g.add("LatentBatchSeedBehavior", "17", samples=latent, seed_behavior="fixed")  # one noise, both rows
    sample(g, ["1", 0], positive, latent, seed, sampler, steps)
    return g


def latent_of(comfy, graph: Graph, name: str) -> torch.Tensor:
    probe(graph, "26", name, latent=["8", 0])
    comfy.run_ok(graph)
    return comfy.probe(name)[0]["latent"]


def rounding(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / (b.max() - b.min())).item()


@pytest.mark.parametrize("sampler", ["pndm", "euler"])
def test_rows_against_plain_generations(comfy, tiny_model, sampler):
    """Row 0 of an edit is the plain generation of the source prompt, exactly: the attention control and LocalBlend
    never touch it. Without replace steps and blend, row 1 is the plain generation of the target prompt, exactly.
    "Exactly" in the same batch of two rows; a lone generation (a smaller UNet batch) differs by float rounding.
    With ComfyUI's euler, LocalBlend runs on the x0 prediction and logs once that this approximates."""
    g = edit(tiny_model, seed=5, prefix="edit_l3")
    sample(g, ["6", 0], ["4", 0], ["7", 0], 5, sampler)
    logged = comfy.log.read_text().count(APPROXIMATION)
    edited = latent_of(comfy, g, f"l3_edit_{sampler}")
    assert comfy.log.read_text().count(APPROXIMATION) - logged == (sampler == "euler")  # one line per run
    g = edit(tiny_model, seed=5, cross_replace=0.0, self_replace=0.0, local_blend=False, prefix="edit_l3")
    sample(g, ["6", 0], ["4", 0], ["7", 0], 5, sampler)
    uncontrolled = latent_of(comfy, g, f"l3_uncontrolled_{sampler}")
    both = latent_of(comfy, plain(tiny_model, seed=5, sampler=sampler, rows="both"), f"l3_plain_{sampler}")
    assert edited.shape == uncontrolled.shape == both.shape == (2, 4, 8, 8)
    assert torch.equal(edited[0], both[0]) and torch.equal(uncontrolled, both)
    assert not torch.equal(edited[1], both[1])  # the edit changed the target row
    lone = {
        rows: latent_of(comfy, plain(tiny_model, 5, sampler, rows), f"l3_{rows}_{sampler}")
        for rows in ("source", "target")
    }
    errors = [rounding(both[0], lone["source"][0]), rounding(both[1], lone["target"][0])]
    print(f"{sampler}: rows of one batch vs lone generations, max|d| / range: {errors[0]:.1e}, {errors[1]:.1e}")
    assert max(errors) <= 1e-5


@pytest.fixture(scope="module")
def photo(comfy) -> str:
    """The example cat at 128x128: LocalBlend's map comes from the latent/4 layers (4x4 here) max-pooled 3x3, so at
    64x64 (2x2) it would be flat and its mask all on or all off."""
    image = Image.open(comfy.base / "input" / "blipd_example_cat.jpg").convert("RGB").resize((128, 128), Image.BICUBIC)
    return comfy.put_input("blipd_test_edit_photo.png", np.asarray(image))


def photo_edit(comfy, model: str, photo: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The edit of `photo` ("a cat sitting on a sofa", the cat replaced): its rows and LocalBlend's maps."""
    g = edit(model, photo=photo, source="cat", prompt="sitting on a sofa", threshold=threshold, prefix="edit_photo")
    g.add("ProbeEditMaps", "21", model=["6", 0], name="photo_edit_maps")
    g["8"]["inputs"]["model"] = ["21", 0]
    return latent_of(comfy, g, "photo_edit"), comfy.probe("photo_edit_maps")[0]["maps"]


def test_real_photo_edit(comfy, tiny_model, photo):
    """Inversion, then the edit (reference_ddim from the inverted latent). Row 0 follows its conditional
    prediction only, as the original: it is the photo's reconstruction, the reference DDIM at guidance 1 from the
    same inversion with the source prompt (up to the rounding of another UNet batch). Row 1 is the edit; where
    the last LocalBlend mask is off it equals row 0 exactly: the rest of the photo is kept. The maps are the
    source row's attention, which no threshold changes: a first run picks one that splits the last map."""
    _, maps = photo_edit(comfy, tiny_model, photo, 0.3)
    values = maps[-1].unique()  # ascending
    threshold = ((values[len(values) // 2 - 1] + values[len(values) // 2]) / 2).item()
    edited, again = photo_edit(comfy, tiny_model, photo, threshold)
    g = inversion(tiny_model, photo, "a cat sitting on a sofa", cfg=1.0, prefix="edit_photo_recon")
    probe(g, "26", "photo_recon", latent=["7", 0])
    comfy.run_ok(g)
    reconstruction = comfy.probe("photo_recon")[0]["latent"]
    assert edited.shape == (2, 4, 16, 16) and maps.shape == (4, 16, 16)  # reference_ddim: a model call per step
    assert torch.equal(again, maps)
    kept = maps[-1] <= threshold
    error = rounding(edited[0], reconstruction[0])
    print(
        f"real-photo edit: source row vs reconstruction max|d| / range {error:.1e}; "
        f"the last mask (threshold {threshold:.4f}) keeps {kept.float().mean():.2f} of the photo"
    )
    assert error <= 1e-5
    assert 0 < kept.sum() < kept.numel()
    assert torch.equal(edited[1][:, kept], edited[0][:, kept])
    assert not torch.equal(edited[1], edited[0])


def rerun(graph: Graph, n: int = 1) -> Graph:
    """The same graph, computed again: trailing spaces change the negative node's input (so ComfyUI's cache does
    not answer), not its tokens."""
    graph["5"]["inputs"]["text"] += " " * n
    return graph


def test_no_state_between_prompts(comfy, tiny_model):
    """The same edit twice gives the same rows (a fresh run state each time), and a plain generation after an
    edit equals one before it (the patch lives on the patched MODEL's copy only)."""
    before = latent_of(comfy, plain(tiny_model, seed=9), "leak_before")
    first = latent_of(comfy, edit(tiny_model, seed=9, prefix="edit_leak"), "leak_edit1")
    second = latent_of(comfy, rerun(edit(tiny_model, seed=9, prefix="edit_leak")), "leak_edit2")
    after = latent_of(comfy, rerun(plain(tiny_model, seed=9)), "leak_after")
    assert torch.equal(first, second) and torch.equal(before, after)


def test_the_example_workflows_run(comfy):
    for name in ("edit_generated", "edit_real_image", "virtual_tryon"):
        graph = shrink(twin(name), size=64, steps=2)
        entry = comfy.run_ok(graph)
        # the picture's output node, not the Subject Encoder's preview of what it encoded
        save = next(node for node in entry["outputs"] if graph[node]["class_type"] in ("SaveImage", "PreviewImage"))
        assert len(entry["outputs"][save]["images"]) == (2 if name == "edit_generated" else 3), name


# --- bad input (docs/reliability.md, "Subject-driven editing") ------------------------------------------


@covers("edit-source-word-empty")
def test_source_subject_empty(comfy, tiny_model):
    """The source prompt is "a {source_subject} {prompt}": the word is always in it unless it is empty."""
    failed(
        comfy, edit(tiny_model, source="  "), "BlipDiffusionEditPrompt", "source_subject: empty", "'a  on the grass'"
    )
    healthy(comfy, tiny_model)


@covers("edit-source-word-not-in-prompt")
def test_source_subject_not_in_the_prompt(comfy, tiny_model):
    """A source word whose tokens do not reach the prompt: ComfyUI's "embedding:<name>" syntax becomes an
    embedding (or, when none has that name, nothing), never the word's tokens; the error names the word and the
    source prompt."""
    failed(
        comfy,
        edit(tiny_model, source="embedding:no_such_embedding"),
        "BlipDiffusionEditPrompt",
        "source_subject: 'embedding:no_such_embedding' is not a word of the source prompt",
        "'a embedding:no_such_embedding on the grass'",
    )
    healthy(comfy, tiny_model)


@covers("float-nan-edit")
@pytest.mark.parametrize("input_name", ["cross_replace", "self_replace", "blend_threshold"])
def test_nan_in_an_edit_float_is_refused(comfy, tiny_model, input_name):
    g = edit(tiny_model)
    g["6"]["inputs"][input_name] = math.nan
    rejected(comfy, g, "6", input_name, f"{input_name}: expected a finite number, got nan")


@covers("edit-prompt-10000-words")
def test_edit_prompt_of_10000_words(comfy, tiny_model):
    """Hostile length: the error comes at once, quotes the prompt shortened, and the memory stays put."""
    with memory_guard(comfy, 2.0):
        message = failed(
            comfy,
            edit(tiny_model, prompt=" ".join(["red"] * 10_000)),
            "BlipDiffusionEditPrompt",
            "prompt: the source prompt",
            "10004 tokens",
            "characters)",
        )
    assert len(message) < 2000
    healthy(comfy, tiny_model)


@covers("edit-prompt-too-long")
def test_edit_prompt_too_long(comfy, tiny_model):
    """60 words: the source prompt fits (64 tokens), the original's target text does not (16 placeholders more:
    80); without placeholders the model holds the target's first 59 tokens, as generation does. 74 words: the
    source prompt is too long itself (78 tokens)."""
    words = " ".join(["red"] * 60)
    failed(comfy, edit(tiny_model, prompt=words), "BlipDiffusionEditPrompt", "prompt: the target text", "80 tokens")
    assert latent_of(comfy, edit(tiny_model, prompt=words, placeholder="none", steps=2), "edit_long").shape[0] == 2
    words = " ".join(["red"] * 74)
    failed(comfy, edit(tiny_model, prompt=words), "BlipDiffusionEditPrompt", "prompt: the source prompt", "78 tokens")
    healthy(comfy, tiny_model)


@covers("edit-conditioning-unpatched-model")
def test_edit_conditioning_with_the_unpatched_model(comfy, tiny_model):
    g = edit(tiny_model)
    g["8"]["inputs"]["model"] = ["1", 0]
    failed(comfy, g, "BlipDiffusionSampler", "positive: this is a BLIP-Diffusion Edit Prompt's CONDITIONING")
    healthy(comfy, tiny_model)


@covers("edit-conditioning-unpatched-model-ksampler")
def test_edit_conditioning_with_the_unpatched_model_in_a_ksampler(comfy, tiny_model):
    """Documented: ComfyUI cuts a conditioning to the latent batch, so a batch-1 latent renders the source row."""
    g = edit(tiny_model, seed=3)
    sample(g, ["1", 0], ["4", 0], ["7", 0], 3, "euler")
    source = latent_of(comfy, plain(tiny_model, seed=3, sampler="euler"), "unpatched_source")
    assert torch.equal(latent_of(comfy, g, "unpatched_ksampler"), source)


@covers("edit-model-plain-conditioning")
@pytest.mark.parametrize("sampler", ["pndm", "euler"])
def test_patched_model_with_a_plain_conditioning(comfy, tiny_model, sampler):
    g = edit(tiny_model)
    sample(g, ["6", 0], g.add("CLIPTextEncode", "14", clip=["1", 1], text=SOURCE_PROMPT), ["7", 0], 0, sampler)
    node = "BlipDiffusionSampler" if sampler == "pndm" else "KSampler"
    failed(comfy, g, node, "positive: this MODEL is patched for an edit", "use the unpatched MODEL")
    healthy(comfy, tiny_model)


@covers("edit-patched-twice")
def test_prompt_to_prompt_twice(comfy, tiny_model):
    g = edit(tiny_model)
    g.add(
        "BlipDiffusionPromptToPrompt",
        "16",
        model=["6", 0],
        edit=["4", 1],
        cross_replace=0.8,
        self_replace=0.4,
        local_blend=True,
        blend_threshold=0.3,
    )
    g["8"]["inputs"]["model"] = ["16", 0]
    failed(comfy, g, "BlipDiffusionPromptToPrompt", "model: this MODEL is already patched for an edit")
    healthy(comfy, tiny_model)


@covers("edit-latent-batch")
@pytest.mark.parametrize("sampler", ["pndm", "euler"])
def test_edit_latent_batch_not_1(comfy, tiny_model, sampler):
    g = edit(tiny_model)
    g["7"]["inputs"]["batch_size"] = 2
    sample(g, ["6", 0], ["4", 0], ["7", 0], 0, sampler)
    node = "BlipDiffusionSampler" if sampler == "pndm" else "KSampler"
    failed(comfy, g, node, "latent_image: an edit samples its two rows (source, target) from one start", "got 2")
    healthy(comfy, tiny_model)


@covers("edit-size-not-multiple-of-32")
def test_edit_size_not_a_multiple_of_32(comfy, tiny_model):
    g = edit(tiny_model)
    g["7"]["inputs"].update(width=88, height=72)
    failed(
        comfy,
        g,
        "BlipDiffusionSampler",
        "local_blend: LocalBlend needs an image whose width and height are multiples of 32; this one is 88x72",
    )
    g["6"]["inputs"]["local_blend"] = False
    assert latent_of(comfy, g, "edit_88x72").shape == (2, 4, 9, 11)


@covers("edit-positive-combined")
def test_edit_positive_with_several_entries(comfy, tiny_model):
    g = edit(tiny_model)
    g.add("ConditioningCombine", "15", conditioning_1=["4", 0], conditioning_2=["5", 0])
    g["8"]["inputs"]["positive"] = ["15", 0]
    failed(
        comfy,
        g,
        "BlipDiffusionSampler",
        "positive: an edit needs the BLIP-Diffusion Edit Prompt's CONDITIONING alone",
        "this positive has 2 entries",
    )
    healthy(comfy, tiny_model)


@covers("edit-cancel")
def test_cancel_mid_edit_then_a_normal_prompt(comfy, tiny_model):
    before = latent_of(comfy, plain(tiny_model, seed=11), "cancel_before")
    end, steps = asyncio.run(
        run_and_interrupt(comfy, edit(tiny_model, size=256, steps=40, seed=12), at_step=2, node="8")
    )
    assert end == "execution_interrupted" and 2 <= max(steps) < 40
    healthy(comfy, tiny_model)
    assert torch.equal(latent_of(comfy, rerun(plain(tiny_model, seed=11)), "cancel_after"), before)
    assert comfy.get_json("/queue") == {"queue_running": [], "queue_pending": []}


def test_a_comfyui_without_the_sampling_wrappers_disables_only_editing(tmp_path):
    """A ComfyUI without OUTER_SAMPLE wrappers (a version before them, or one that renamed them): the two editing
    nodes are gone, with a log line that names the symbol; the sampler (which only asks whether it samples an
    edit) stays."""
    with ComfyServer(prepare_base(tmp_path), hide=["comfy.patcher_extension:WrappersMP.OUTER_SAMPLE"]) as server:
        info = server.get_json("/object_info")
        log = server.log.read_text(errors="replace")
    assert "BlipDiffusionEditPrompt" not in info and "BlipDiffusionPromptToPrompt" not in info
    assert "BlipDiffusionSampler" in info and "BlipDiffusionMultimodalPromptFuse" in info
    line = next(line for line in log.splitlines() if "WrappersMP.OUTER_SAMPLE" in line)
    assert "BlipDiffusionEditPrompt, BlipDiffusionPromptToPrompt" in line
