"""Hostile and extreme inputs through the real server's HTTP API (issue 18): non-finite or malformed subjects,
values within the UI's limits that asked for unbounded work, and errors that did not say which input.

Every case runs under memory_guard (a regression fails the test instead of taking the machine down) and is a row of
docs/reliability.md. Files a hostile user can place go through POST /upload/image, as they would.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from blip_diffusion_nodes.tests.comfy.reliability import covers, failed, healthy, memory_guard, rejected, rows, small
from blip_diffusion_nodes.tests.graphs import loaded_subject, previewed, probe

SUBJECT = {"format": "blip_diffusion_subject", "version": "1", "category": "cat"}


def upload_subject(comfy, name: str, embeds: torch.Tensor, **metadata) -> str:
    """A subject file placed in the input folder over HTTP, as anyone who reaches the server can; its Load
    Subject name."""
    comfy.upload(name, safetensors_bytes({"embeds": embeds}, metadata={**SUBJECT, **metadata}))
    return f"{name} [input]"


# --- subjects that would have made a black or meaningless picture -------------------------------------------

NON_FINITE = [  # (row, embeds, expected)
    ("subject-file-nan", torch.full((1, 16, 768), math.nan), "hold NaN or infinite values"),
    (
        "subject-file-inf",
        torch.zeros(1, 16, 768).index_fill_(2, torch.tensor([5]), math.inf),
        "hold NaN or infinite values",
    ),
    ("subject-file-no-views", torch.zeros(0, 16, 768), "shape (0, 16, 768); expected [views, 16, width] with 1 to 256"),
    ("subject-file-int", torch.zeros(1, 16, 768, dtype=torch.int32), "must be floating point, got torch.int32"),
]
rows(*(row for row, *_ in NON_FINITE))


@pytest.mark.parametrize("row, embeds, expected", NON_FINITE, ids=[n[0] for n in NON_FINITE])
def test_malformed_subject_files_are_refused(comfy, tiny_model, row, embeds, expected):
    name = upload_subject(comfy, f"rel_{row}.safetensors", embeds)
    graph = small(tiny_model, prefix="rel_bad_subject")
    graph["4"]["inputs"]["subject"] = graph.add("BlipDiffusionLoadSubject", subject_file=name)
    with memory_guard(comfy):
        failed(comfy, graph, "BlipDiffusionLoadSubject", f"rel_{row}.safetensors", expected)
    healthy(comfy, tiny_model)


@covers("subject-file-huge-category")
def test_megabytes_of_metadata_are_refused_before_parsing(comfy, tiny_model):
    name = upload_subject(comfy, "rel_long_category.safetensors", torch.zeros(1, 16, 768), category="cat " * 2_000_000)
    with memory_guard(comfy):
        failed(
            comfy,
            loaded_subject(name),
            "BlipDiffusionLoadSubject",
            "rel_long_category.safetensors",
            "a subject file's header (its metadata) of",
            "at most 1048576",
        )
    healthy(comfy, tiny_model)


@covers("image-weights-overflow")
def test_weights_whose_sum_overflows_are_equal_weights(comfy, tiny_model):
    """Two weights of 1e308 are equal weights (their float sum would be infinity, and every weight 0)."""
    graph = small(tiny_model)
    graph["3"]["inputs"]["image"] = graph.add("RepeatImageBatch", image=["2", 0], amount=2)
    huge = graph.add("BlipDiffusionMultimodalPromptFuse", **{**graph["4"]["inputs"], "image_weights": "1e308, 1e308"})
    equal = graph.add("BlipDiffusionMultimodalPromptFuse", **{**graph["4"]["inputs"], "image_weights": "1, 1"})
    probe(graph, None, "rel_weights_huge", conditioning=huge)
    probe(graph, None, "rel_weights_equal", conditioning=equal)
    comfy.run_ok(graph)
    huge_cond, equal_cond = (comfy.probe(f"rel_weights_{k}")[0]["cond0"] for k in ("huge", "equal"))
    assert torch.isfinite(huge_cond).all() and torch.equal(huge_cond, equal_cond)


# --- NaN in a JSON prompt -----------------------------------------------------------------------------------

NAN_FLOATS = [  # (row, node in small(), input)
    ("float-nan-cfg", "7", "cfg"),
    ("float-nan-denoise", "7", "denoise"),
    ("float-nan-prompt-strength", "4", "prompt_strength"),
]
rows(*(row for row, *_ in NAN_FLOATS))


@pytest.mark.parametrize("row, node, input_name", NAN_FLOATS, ids=[n[0] for n in NAN_FLOATS])
def test_nan_in_a_float_input_is_refused(comfy, tiny_model, row, node, input_name):
    """JSON prompts can carry NaN, which ComfyUI's min/max check lets through; every FLOAT of the pack refuses it
    (tools/lint_safety.py checks that each one is checked)."""
    graph = small(tiny_model)
    graph[node]["inputs"][input_name] = math.nan
    rejected(comfy, graph, node, input_name, f"{input_name}: expected a finite number, got nan")


OUT_OF_RANGE = [  # (row, node in small(), input, value, expected)
    ("number-above-max-denoise", "7", "denoise", 1.5, "denoise: 1.5 is above the maximum of 1"),
    ("number-below-min-cfg", "7", "cfg", -3.0, "cfg: -3 is below the minimum of 0"),
]
rows(*(row for row, *_ in OUT_OF_RANGE))


@pytest.mark.parametrize("row, node, input_name, value, expected", OUT_OF_RANGE, ids=[n[0] for n in OUT_OF_RANGE])
def test_numbers_outside_the_declared_range_are_refused(comfy, tiny_model, row, node, input_name, value, expected):
    """ComfyUI skips its own min/max check for the inputs a node's validate_inputs receives; the pack checks them
    against the same schema limits (api.number_error)."""
    graph = small(tiny_model)
    graph[node]["inputs"][input_name] = value
    rejected(comfy, graph, node, input_name, expected)


@covers("float-nan-blend-ratio", "float-nan-controlnet")
def test_nan_in_blend_and_controlnet_floats_is_refused(comfy, tiny_model):
    graph = small(tiny_model)
    graph["4"]["inputs"]["subject"] = graph.add(
        "BlipDiffusionSubjectBlend", "30", subject_a=["3", 0], subject_b=["3", 0], ratio=math.nan
    )
    rejected(comfy, graph, "30", "ratio", "ratio: expected a finite number, got nan")
    graph = small(tiny_model)
    graph.add(
        "BlipDiffusionControlNetApply",
        "31",
        positive=["4", 0],
        negative=["5", 0],
        control_net=graph.add("BlipDiffusionControlNetLoader", model_name=tiny_model),
        image=["2", 0],
        strength=math.nan,
        start_percent=0.0,
        end_percent=1.0,
    )
    graph["7"]["inputs"].update(positive=["31", 0], negative=["31", 1])
    rejected(comfy, graph, "31", "strength", "strength: expected a finite number, got nan")


@covers("cn-window-empty")
def test_an_empty_controlnet_window_is_refused(comfy, tiny_model):
    graph = small(tiny_model)
    graph.add(
        "BlipDiffusionControlNetApply",
        "31",
        positive=["4", 0],
        negative=["5", 0],
        control_net=graph.add("BlipDiffusionControlNetLoader", model_name=tiny_model),
        image=["2", 0],
        strength=1.0,
        start_percent=0.5,
        end_percent=0.5,
    )
    graph["7"]["inputs"].update(positive=["31", 0], negative=["31", 1])
    rejected(comfy, graph, "31", "start_percent", "start_percent: 0.5 equals end_percent 0.5: the window is empty")


# --- schedules: any steps and denoise the node accepts ---------------------------------------------------

SCHEDULES = [  # (row, steps, denoise, scheduler, expected)
    (
        "img2img-steps-over-1000",
        120,
        0.1,
        "reference",
        "120 steps at denoise 0.1 need a schedule of 1200 steps, but the reference schedule has at most 1000",
    ),
    ("denoise-tiny-reference", 2, 1e-9, "reference", "use a denoise of at least 0.002"),
    ("denoise-tiny-comfy", 2, 1e-9, "normal", "at most 10000 are supported: use a denoise of at least 0.0002"),
]
rows(*(row for row, *_ in SCHEDULES))


@pytest.mark.parametrize("row, steps, denoise, scheduler, expected", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_schedules_too_long_for_the_reference_are_refused(comfy, tiny_model, row, steps, denoise, scheduler, expected):
    graph = small(tiny_model)
    graph["7"]["inputs"].update(
        steps=steps, denoise=denoise, scheduler=scheduler, sampler_name="euler" if scheduler != "reference" else "pndm"
    )
    with memory_guard(comfy, 1.0):
        rejected(comfy, graph, "7", "denoise", f"denoise: {steps} steps at denoise {denoise:g}", expected)


@covers("img2img-1000-timesteps")
def test_the_longest_reference_schedule_runs(comfy, tiny_model):
    """2 steps at denoise 0.002: the last 2 of the 1000-timestep reference schedule (t = 1 and 0), distinct."""
    graph = small(tiny_model, prefix="rel_long_schedule", steps=2)
    graph["7"]["inputs"]["denoise"] = 0.002
    assert comfy.image(comfy.run_ok(graph), "9").shape == (64, 64, 3)


# --- prompts: only what fits is built ------------------------------------------------------------------------


@covers("prompt-10000-words-x500")
def test_a_huge_prompt_repeated_500_times_costs_what_fits(comfy, tiny_model):
    """10,000 words at strength 5 x 100 reps (the UI's maximums): only the 59 tokens that fit are built."""
    text = " ".join(["red", "blue"] * 5000)
    graph = small(tiny_model, prompt=text, strength=5.0, reps=100, prefix="rel_huge_prompt")
    probe(graph, "20", "rel_huge_prompt", conditioning=["4", 0])
    short = small(tiny_model, prompt=" ".join(["red", "blue"] * 40), strength=1.0, reps=1, prefix="rel_short_prompt")
    probe(short, "20", "rel_short_prompt", conditioning=["4", 0])
    with memory_guard(comfy, 1.0):
        comfy.run_ok(graph, timeout=120)
    comfy.run_ok(short)
    huge, fits = (comfy.probe(name)[0]["cond0"] for name in ("rel_huge_prompt", "rel_short_prompt"))
    assert torch.equal(huge, fits)  # the first 59 text tokens are the same


# --- model folders whose config.json asks for absurd or wrong things -----------------------------------------


def qformer_config(tiny, **vision) -> dict:
    config = json.loads((tiny / "qformer" / "config.json").read_text())
    config["vision_config"].update(vision)
    return config


CONFIGS = [  # (row, part, config(tiny) -> JSON text, expected in the Loader's error)
    (
        "config-qformer-100000-layers",
        "qformer",
        lambda t: json.dumps(qformer_config(t, num_hidden_layers=100_000)),
        "qformer/config.json: vision_config: num_hidden_layers is 100000; expected a int from 1 to 64",
    ),
    (
        "config-qformer-width-1e9",
        "qformer",
        lambda t: json.dumps(qformer_config(t, hidden_size=10**9)),
        "vision_config: hidden_size is 1000000000; expected a int from 1 to 8192",
    ),
    (
        "config-qformer-string",
        "qformer",
        lambda t: json.dumps(qformer_config(t, hidden_size="wide")),
        "vision_config: hidden_size is 'wide'; expected a int",
    ),
    (
        "config-unet-million-layers",
        "unet",
        lambda t: json.dumps({**json.loads((t / "unet" / "config.json").read_text()), "layers_per_block": 1_000_000}),
        "unet/config.json: layers_per_block is 1000000; expected an integer from 1 to 8",
    ),
    ("config-unet-list", "unet", lambda t: "[]", "unet/config.json holds a JSON list, expected an object of settings"),
    (
        "config-unet-widths-string",
        "unet",
        lambda t: json.dumps({"block_out_channels": "wide"}),
        "unet/config.json: block_out_channels is wide; expected 1 to 6 widths",
    ),
]
rows(*(row for row, *_ in CONFIGS))


@pytest.mark.parametrize("row, part, config, expected", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_configs_are_checked_before_anything_is_built(comfy, comfy_base, tiny_model, row, part, config, expected):
    tiny = comfy_base / "models" / "blip_diffusion" / tiny_model
    folder = comfy_base / "models" / "blip_diffusion" / f"rel-{row}"
    folder.mkdir()
    try:
        for item in tiny.iterdir():
            if item.name != part:
                (folder / item.name).symlink_to(item)
        (folder / part).mkdir()
        for item in (tiny / part).iterdir():
            if item.name != "config.json":
                (folder / part / item.name).symlink_to(item)
        (folder / part / "config.json").write_text(config(tiny))
        with memory_guard(comfy, 1.0):
            message = failed(
                comfy,
                previewed("BlipDiffusionLoader", model_name=folder.name, weight_dtype="auto"),
                "BlipDiffusionLoader",
                expected,
            )
        assert folder.name in message  # names the folder
    finally:
        shutil.rmtree(folder)
    healthy(comfy, tiny_model)


@covers("edge-resolution-16384")
def test_edge_resolution_is_bounded(comfy):
    from blip_diffusion_nodes.tests.graphs import edges

    graph = edges(
        "BlipDiffusionCannyEdges", "blipd_example_cup.jpg", low_threshold=30, high_threshold=70, resolution=16384
    )
    rejected(comfy, graph, "2", "resolution", "Value 16384 bigger than max of 2048")


# --- errors that name the input ---------------------------------------------------------------------------------


@covers("name-5000-chars")
def test_very_long_names_are_refused_under_their_own_input(comfy, tiny_model):
    name = "x" * 5000
    for node, input_name, graph in (
        ("1", "model_name", previewed("BlipDiffusionLoader", model_name=name, weight_dtype="auto")),
        ("1", "model_name", previewed("BlipDiffusionSubjectEncoderLoader", model_name=name, weight_dtype="auto")),
        ("1", "subject_file", loaded_subject(name + ".safetensors")),
    ):
        text = rejected(comfy, graph, node, input_name, "is not a file name: it is", "characters long")
        assert "Errno" not in text and len(text) < 1000
    healthy(comfy, tiny_model)


PREFIXES = [  # (row, prefix, expected)
    ("save-prefix-nul", "cat\x00.png", "it holds control characters"),
    ("save-prefix-300-chars", "c" * 300, "it is 300 characters long"),
    ("save-prefix-dot", ".", "its file name part is empty or hidden"),
    ("save-prefix-trailing-slash", "subjects/", "its file name part is empty or hidden"),
]
rows(*(row for row, *_ in PREFIXES))


def saving(model: str, prefix: str):
    graph = small(model)
    graph = type(graph)({k: v for k, v in graph.items() if k in ("1", "2", "3")})  # the save is the only output
    graph.add("BlipDiffusionSaveSubject", "12", subject=["3", 0], filename_prefix=prefix)
    return graph


@pytest.mark.parametrize("row, prefix, expected", PREFIXES, ids=[p[0] for p in PREFIXES])
def test_prefixes_that_make_no_file_name(comfy, tiny_model, row, prefix, expected):
    rejected(comfy, saving(tiny_model, prefix), "12", "filename_prefix", expected)


@covers("save-prefix-through-a-file")
def test_a_prefix_through_an_existing_file(comfy, tiny_model):
    (comfy.base / "output" / "rel_a_file").write_text("not a folder")
    failed(
        comfy,
        saving(tiny_model, "rel_a_file/cat"),
        "BlipDiffusionSaveSubject",
        "filename_prefix: cannot write a subject file there",
    )
    healthy(comfy, tiny_model)


@covers("subject-file-is-a-folder")
def test_a_folder_named_like_a_subject_file(comfy):
    folder = comfy.base / "models" / "blip_diffusion_subjects" / "rel_folder.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        rejected(
            comfy, loaded_subject("rel_folder.safetensors"), "1", "subject_file", "is a folder, not a subject file"
        )
    finally:
        folder.rmdir()


@covers("long-input-echo")
def test_errors_quote_long_inputs_shortened(comfy, tiny_model):
    graph = small(tiny_model)
    graph["7"]["inputs"]["sampler_name"] = "y" * 10_000
    text = rejected(comfy, graph, "7", "sampler_name", "(10000 characters)", "is not one of the choices")
    assert len(text) < 2000
    weights = small(tiny_model)
    weights["4"]["inputs"]["image_weights"] = ", ".join(["1"] * 10_000)
    message = failed(comfy, weights, "BlipDiffusionMultimodalPromptFuse", "expected 1 weights", "characters)")
    assert len(message) < 2000
    healthy(comfy, tiny_model)


def test_uploads_land_in_the_input_folder_as_data(comfy):
    """Control for the cases above: /upload/image really places a .safetensors file in the input folder."""
    data = safetensors_bytes({"x": torch.zeros(1)})
    reply = comfy.upload("rel_upload_probe.safetensors", data)
    assert reply["name"] == "rel_upload_probe.safetensors"
    assert (comfy.base / "input" / reply["name"]).read_bytes() == data
