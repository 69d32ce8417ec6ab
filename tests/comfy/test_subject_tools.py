"""Subject tools through the real server: several views, per-image weights, one image per latent,
blends, save/load of subject files, the LAVIS cache import, and subject_reuse's first run.
(tests/comfy/test_zero_shot.py runs every workflow twin, the subject ones included.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blip_diffusion_nodes.tests.graphs import SubjectGraph as Graph
from blip_diffusion_nodes.tests.graphs import loaded_subject, probe, shrink, twin
from blip_diffusion_nodes.tools.comfy_server import execution_error

ROOT = Path(__file__).resolve().parents[2]
CAT, CUP = "blipd_example_cat.jpg", "blipd_example_cup.jpg"


def batch(g: Graph, *images: list) -> list:
    out = images[0]
    for image in images[1:]:
        out = g.add("ImageBatch", image1=out, image2=image)
    return out


def flipped(g: Graph, image: list) -> list:
    return g.add("ImageFlip", image=image, flip_method="y-axis: horizontally")


def test_averaging_identical_views_equals_one_view(comfy, tiny_model):
    g = Graph(tiny_model)
    cat = g.image()
    one, three = g.encode(cat), g.encode(g.add("RepeatImageBatch", image=cat, amount=3))
    probe(g, None, "views_one", subject=one, conditioning=g.fuse(one))
    probe(g, None, "views_three", subject=three, conditioning=g.fuse(three))
    comfy.run_ok(g)
    (one_t, _), (three_t, meta) = comfy.probe("views_one"), comfy.probe("views_three")
    assert three_t["subject"].shape == (3, 16, 768) and meta["category"] == "cat"
    assert three_t["cond0"].shape == one_t["cond0"].shape == (1, 77, 768)
    torch.testing.assert_close(three_t["cond0"], one_t["cond0"], rtol=0, atol=1e-5)


def test_image_weights_one_zero_equal_the_first_image_alone(comfy, tiny_model):
    g = Graph(tiny_model)
    cat = g.image()
    two = g.encode(batch(g, cat, flipped(g, cat)))
    probe(g, None, "weights_first", conditioning=g.fuse(two, image_weights="1, 0"))
    probe(g, None, "weights_second", conditioning=g.fuse(two, image_weights="0, 3"))
    probe(g, None, "weights_equal", conditioning=g.fuse(two, image_weights=""))
    probe(g, None, "weights_rows", conditioning=g.fuse(two, "per latent"))
    comfy.run_ok(g)
    rows = comfy.probe("weights_rows")[0]["cond0"]
    first, second, equal = (comfy.probe(f"weights_{n}")[0]["cond0"] for n in ("first", "second", "equal"))
    # The same embeddings through the same CLIP: bit for bit.
    assert torch.equal(first[0], rows[0]) and torch.equal(second[0], rows[1])
    assert not torch.allclose(first, equal, atol=1e-3) and not torch.allclose(second, equal, atol=1e-3)


def test_bad_image_weights_name_the_input(comfy, tiny_model):
    g = Graph(tiny_model)
    probe(g, None, "bad_weights", conditioning=g.fuse(g.encode(g.image()), image_weights="1, 2"))
    error = execution_error(comfy.run(g))
    assert error["node_type"] == "BlipDiffusionMultimodalPromptFuse"
    assert "image_weights: expected 1 weights (one per subject image), got 2" in error["exception_message"]


def per_latent_sample(comfy, tiny_model, views: tuple[str, str], name: str) -> torch.Tensor:
    """Latents of a 2-latent batch sampled with a per-latent subject of two views ('cat' or 'flip')."""
    g = Graph(tiny_model)
    cat = g.image()
    images = {"cat": cat, "flip": flipped(g, cat)}
    positive = g.fuse(g.encode(batch(g, *(images[v] for v in views))), "per latent")
    negative = g.add("CLIPTextEncode", clip=[g.model, 1], text="")
    latent = g.add("EmptyLatentImage", width=64, height=64, batch_size=2)
    samples = g.add(
        "BlipDiffusionSampler",
        model=[g.model, 0],
        positive=positive,
        negative=negative,
        latent_image=latent,
        seed=7,
        steps=2,
        cfg=7.5,
        sampler_name="pndm",
        scheduler="reference",
        denoise=1.0,
    )
    probe(g, None, name, conditioning=positive, latent=samples)
    comfy.run_ok(g)
    return comfy.probe(name)[0]


def test_per_latent_gives_each_latent_its_own_image(comfy, tiny_model):
    mixed = per_latent_sample(comfy, tiny_model, ("cat", "flip"), "per_latent_mixed")
    cats = per_latent_sample(comfy, tiny_model, ("cat", "cat"), "per_latent_cats")
    flips = per_latent_sample(comfy, tiny_model, ("flip", "flip"), "per_latent_flips")
    cond = mixed["cond0"]
    assert cond.shape == (2, 77, 768) and not torch.allclose(cond[0], cond[1], atol=1e-3)
    # Same seed, same noise per batch index: latent i is what image i alone gives at index i.
    latent = mixed["latent"]
    assert latent.shape[0] == 2
    torch.testing.assert_close(latent[0], cats["latent"][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(latent[1], flips["latent"][1], rtol=0, atol=1e-5)
    assert not torch.allclose(latent[0], flips["latent"][0], atol=1e-3)


def test_blend_endpoints_are_exact_and_category_is_stated(comfy, tiny_model):
    g = Graph(tiny_model)
    cat, cup = g.encode(g.image(CAT), "cat"), g.encode(g.image(CUP), "cup")
    probe(g, None, "blend_a", subject=cat)
    probe(g, None, "blend_b", subject=cup)
    for name, ratio, category in (("blend_0", 0.0, ""), ("blend_1", 1.0, ""), ("blend_q", 0.25, "cupcat")):
        probe(
            g,
            None,
            name,
            subject=g.add("BlipDiffusionSubjectBlend", subject_a=cat, subject_b=cup, ratio=ratio, category=category),
        )
    comfy.run_ok(g)
    (a, _), (b, _) = comfy.probe("blend_a"), comfy.probe("blend_b")
    (zero, zero_meta), (one, one_meta), (quarter, quarter_meta) = (comfy.probe(f"blend_{n}") for n in "01q")
    assert torch.equal(zero["subject"], a["subject"]) and torch.equal(one["subject"], b["subject"])
    torch.testing.assert_close(quarter["subject"], 0.75 * a["subject"] + 0.25 * b["subject"])
    assert zero_meta["category"] == one_meta["category"] == "cat"  # subject_a's
    assert quarter_meta["category"] == "cupcat"
    assert quarter_meta["subject.blend"] == "0.75 x cat + 0.25 x cup"
    assert quarter_meta["subject.encoder"] == tiny_model and "subject.image_sha256" not in quarter_meta


def saved_file(comfy, entry: dict, node: str) -> Path:
    [locator] = entry["outputs"][node]["subjects"]
    assert locator["type"] == "output"
    return comfy.base / "output" / locator["subfolder"] / locator["filename"]


def test_save_then_load_is_bit_exact_from_models_and_input(comfy, tiny_model):
    g = Graph(tiny_model)
    cat = g.image()
    views = g.encode(batch(g, cat, flipped(g, cat)))
    probe(g, None, "saved_subject", subject=views)
    save, _ = g.add("BlipDiffusionSaveSubject", subject=views, filename_prefix="t_subjects/roundtrip")
    entry = comfy.run_ok(g)
    path = saved_file(comfy, entry, save)
    assert path.parent == comfy.base / "output" / "t_subjects" and path.name.startswith("roundtrip_")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("format", "version", "category", "preprocess", "encoder")} == {
        "format": "blip_diffusion_subject",
        "version": "1",
        "category": "cat",
        "preprocess": "squash",
        "encoder": tiny_model,
    }
    assert len(meta["image_sha256"]) == 64

    models = comfy.base / "models" / "blip_diffusion_subjects" / "pets"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, models / "roundtrip.safetensors")
    shutil.copy(path, comfy.base / "input" / "roundtrip_in.safetensors")
    options = comfy.get_json("/object_info/BlipDiffusionLoadSubject")["BlipDiffusionLoadSubject"]
    listed = options["input"]["required"]["subject_file"][1]["options"]
    assert {"pets/roundtrip.safetensors", "roundtrip_in.safetensors [input]"} <= set(listed)

    g = Graph(tiny_model)
    probe(
        g, None, "loaded_models", subject=g.add("BlipDiffusionLoadSubject", subject_file="pets/roundtrip.safetensors")
    )
    probe(
        g,
        None,
        "loaded_input",
        subject=g.add("BlipDiffusionLoadSubject", subject_file="roundtrip_in.safetensors [input]"),
    )
    comfy.run_ok(g)
    original, original_meta = comfy.probe("saved_subject")
    for name in ("loaded_models", "loaded_input"):
        loaded, loaded_meta = comfy.probe(name)
        assert torch.equal(loaded["subject"], original["subject"])
        assert loaded_meta == original_meta


def rejected(comfy, prompt: dict) -> str:
    """The validation errors of a prompt the server refused to queue."""
    status, body = comfy.submit(prompt)
    assert status == 400, body
    return json.dumps(body["node_errors"])


@pytest.mark.parametrize("name", ["../../escape.safetensors", "/etc/passwd", "../input/x.safetensors [input]"])
def test_load_rejects_names_that_escape_their_folder(comfy, name):
    errors = rejected(comfy, loaded_subject(name))
    assert "must be a name inside" in errors and "not a path" in errors


def test_load_of_a_missing_file_names_the_folders_searched(comfy):
    errors = rejected(comfy, loaded_subject("nope.safetensors"))
    assert "nope.safetensors" in errors and "not found in models/blip_diffusion_subjects" in errors


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/escape", "a/../../escape"])
def test_save_rejects_prefixes_that_escape_the_output_folder(comfy, tiny_model, prefix):
    g = Graph(tiny_model)
    g.add("BlipDiffusionSaveSubject", subject=g.encode(g.image()), filename_prefix=prefix)
    assert "expected a name inside the output folder" in rejected(comfy, g)


@pytest.mark.parametrize(
    "file, metadata, message",
    [
        (
            "version2.safetensors",
            {"format": "blip_diffusion_subject", "version": "2", "category": "cat"},
            "version2.safetensors is a subject file of format version '2'; this pack reads version '1'",
        ),
        (
            "not_a_subject.safetensors",
            None,
            "not_a_subject.safetensors is not a BLIP-Diffusion subject file: expected "
            "metadata format='blip_diffusion_subject'",
        ),
    ],
)
def test_load_of_another_file_kind_or_version_says_what_was_expected(comfy, file, metadata, message):
    folder = comfy.base / "models" / "blip_diffusion_subjects"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"embeds": torch.zeros(1, 16, 768)}, str(folder / file), metadata=metadata)
    entry = comfy.run(loaded_subject(file))
    error = execution_error(entry)
    assert error["node_type"] == "BlipDiffusionLoadSubject" and message in error["exception_message"]


def test_lavis_fine_tuned_subject_imports_and_drives_a_graph(comfy, tiny_model, tmp_path):
    cache = torch.randn(1, 16, 768, generator=torch.Generator().manual_seed(11))
    checkpoint = tmp_path / "checkpoint_39.pth"  # LAVIS's layout: trained parameters under "model"
    torch.save(
        {
            "model": {"ctx_embeddings_cache": cache, "unet.conv_in.weight": torch.randn(320, 4, 3, 3)},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 0,
        },
        checkpoint,
    )
    out = comfy.base / "models" / "blip_diffusion_subjects" / "lavis_dog.safetensors"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "import_lavis_subject.py"),
            str(checkpoint),
            str(out),
            "--category",
            "dog",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr

    g = Graph(tiny_model)
    subject = g.add("BlipDiffusionLoadSubject", subject_file="lavis_dog.safetensors")
    probe(g, None, "lavis_dog", subject=subject, conditioning=g.fuse(subject))
    comfy.run_ok(g)
    tensors, meta = comfy.probe("lavis_dog")
    assert torch.equal(tensors["subject"], cache) and meta["category"] == "dog"
    assert meta["subject.checkpoint"] == "checkpoint_39.pth"
    assert tensors["cond0"].shape == (1, 77, 768)


def test_lavis_import_tool_refuses_a_pickle_that_runs_code(tmp_path):
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": {"ctx_embeddings_cache": torch.ones(1, 16, 768)}, "hook": print}, checkpoint)
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "import_lavis_subject.py"),
            str(checkpoint),
            str(tmp_path / "out.safetensors"),
            "--category",
            "dog",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "weights_only=True rejected it" in run.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_subject_reuse_saves_even_before_its_subject_file_exists(comfy):
    """What the README promises a first run of subject_reuse: the save runs, Load Subject is reported."""
    prompt = shrink(twin("subject_reuse"))
    prompt["4"]["inputs"]["filename_prefix"] = "t_subjects/first_run"
    prompt["5"]["inputs"]["subject_file"] = "not_saved_yet.safetensors [input]"
    status, body = comfy.submit(prompt)
    assert status == 200 and list(body["node_errors"]) == ["5"], body
    assert body["node_errors"]["5"]["dependent_outputs"] == ["11"]  # the image is skipped, the save is not
    entry = comfy.wait(body["prompt_id"])
    assert saved_file(comfy, entry, "4").name == "first_run_00001_.safetensors"
