"""Reliability and security through the real server: the matrix of docs/reliability.md.

A node pack runs inside someone's long-lived ComfyUI next to their other work: bad or hostile
input must give a clear error (node, input, what was expected) in the HTTP 400 body or in
/history, never take the server down, never lose queued work, never run code from a weights
file and never read outside the pack's folders. Every row of the matrix is a case here: a
test marked `@covers("<id>")` or a parametrized case with the row's id as its pytest id;
`test_matrix_doc_lists_exactly_the_tested_rows` keeps the doc and the tests in sync. After each
runtime error, and after each group of HTTP 400 cases (those never reach the executor), the next
valid prompt must succeed.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from blip_diffusion_nodes.tests.comfy.reliability import (
    CAT,
    all_covered_rows,
    covers,
    failed,
    healthy,
    rejected,
    rows,
    small,
)
from blip_diffusion_nodes.tests.graphs import (
    Graph,
    SubjectGraph,
    edges,
    inversion,
    loaded_subject,
    previewed,
    probe,
)
from blip_diffusion_nodes.tools.comfy_server import execution_error
from blip_diffusion_nodes.tools.lint_safety import CHECKS as LINT_CHECKS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"


# --- the matrix doc ------------------------------------------------------------------------------


def doc_ids() -> list[str]:
    return re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(encoding="utf-8"), flags=re.M)


def test_matrix_doc_lists_exactly_the_tested_rows():
    """Rows are covered by the server tests (any tests/comfy module registers its rows with covers()), or by the
    static checks `make lint` runs (tools/lint_safety.py)."""
    ids = doc_ids()
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    covered = all_covered_rows() | set(LINT_CHECKS)
    assert set(ids) == covered, {
        "in the doc, not tested": sorted(set(ids) - covered),
        "tested, not in the doc": sorted(covered - set(ids)),
    }
    assert len(ids) >= 25


# --- hostile model folders -----------------------------------------------------------------------


class Payload:
    """Pickles to a call of open(marker, "w"): loading it unsafely creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickle_bomb(path: Path, marker: Path) -> None:
    """A torch.save checkpoint (zip + pickle, like a released .bin) with the payload among real tensors."""
    torch.save({"weight": torch.zeros(2, 2), "payload": Payload(marker)}, path)


@dataclass(frozen=True)
class Hostile:
    """A model folder like the tiny model, with `part` missing or replaced by `write(part_dir, tiny, marker)`."""

    id: str
    part: str
    write: Callable[[Path, Path, Path], None] | None
    expected: tuple[str, ...]  # in the Loader's error; () = it loads and works

    @property
    def name(self) -> str:  # its own name: ComfyUI caches loader outputs by input values
        return f"rel-{self.id}"


def _config_and(write):
    def build(dst: Path, tiny: Path, marker: Path) -> None:
        dst.mkdir()
        shutil.copy(tiny / dst.name / "config.json", dst / "config.json")
        write(dst, tiny, marker)

    return build


def truncated(file: str):
    def write(dst: Path, tiny: Path, marker: Path) -> None:
        with open(tiny / dst.name / file, "rb") as f:  # an interrupted download: the header and 1 MB of tensors
            header = int.from_bytes(f.read(8), "little")
            f.seek(0)
            (dst / file).write_bytes(f.read(8 + header + (1 << 20)))

    return _config_and(write)


def pickled(file: str):
    return _config_and(lambda dst, tiny, marker: pickle_bomb(dst / file, marker))


def weights_of(other: str, file: str, own_file: str):
    """`part`'s config.json with another component's weights file."""
    return _config_and(lambda dst, tiny, marker: (dst / own_file).symlink_to(tiny / other / file))


def bad_json(dst: Path, tiny: Path, marker: Path) -> None:
    dst.mkdir()
    (dst / "config.json").write_text('{"block_out_channels": [320, 320')  # cut off
    (dst / "diffusion_pytorch_model.safetensors").symlink_to(tiny / "unet" / "diffusion_pytorch_model.safetensors")


def sd2_unet(dst: Path, tiny: Path, marker: Path) -> None:
    """An SD-2-shaped UNet (1024-wide cross-attention, linear projections) of the tiny model's size, all zeros."""
    from blip_diffusion_nodes.tools.make_tiny_model import diffusers_shapes, unet_config, write_json

    config = unet_config("tiny") | {
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
    }
    dst.mkdir()
    write_json(dst / "config.json", config)
    save_file(
        {
            k: torch.zeros(shape, dtype=torch.float16)
            for k, (shape, dtype) in diffusers_shapes(config).items()
            if dtype.is_floating_point
        },
        str(dst / "diffusion_pytorch_model.safetensors"),
    )


UNET_W = "diffusion_pytorch_model.safetensors"
HOSTILE = [
    Hostile("model-no-qformer", "qformer", None, ("qformer/config.json", "qformer/model.safetensors")),
    Hostile("model-no-text-encoder", "text_encoder", None, ("text_encoder/model.safetensors",)),
    Hostile("model-no-tokenizer", "tokenizer", None, ()),
    Hostile("model-no-unet", "unet", None, ("unet/config.json", f"unet/{UNET_W}")),
    Hostile("model-no-vae", "vae", None, (f"vae/{UNET_W}",)),
    Hostile("model-bad-config", "unet", bad_json, ("unet/config.json is not valid JSON",)),
    Hostile(
        "weights-truncated-qformer",
        "qformer",
        truncated("model.safetensors"),
        ("qformer/model.safetensors is not a readable .safetensors file (truncated or corrupt?)",),
    ),
    Hostile(
        "weights-truncated-unet",
        "unet",
        truncated(UNET_W),
        (f"unet/{UNET_W} is not a readable .safetensors file (truncated or corrupt?)",),
    ),
    *(
        Hostile(
            f"weights-pickle-{part.replace('_', '-')}",
            part,
            pickled(file),
            ("refused to load", f"{part}/{file}", "weights_only=True rejected it: it would import or call io.open"),
        )
        for part, file in (
            ("qformer", "pytorch_model.bin"),
            ("text_encoder", "pytorch_model.bin"),
            ("unet", "diffusion_pytorch_model.bin"),
            ("vae", "diffusion_pytorch_model.bin"),
        )
    ),
    Hostile(
        "arch-unet-sd2",
        "unet",
        sd2_unet,
        ("reads this UNet as SD20 (cross-attention context 1024)", "needs an SD-1.5 UNet"),
    ),
    Hostile(
        "arch-unet-holds-vae",
        "unet",
        weights_of("vae", UNET_W, UNET_W),
        (f"unet/{UNET_W} does not match its config.json", "unexpected tensors ['decoder."),
    ),
    Hostile(
        "arch-text-encoder-holds-qformer",
        "text_encoder",
        weights_of("qformer", "model.safetensors", "model.safetensors"),
        ("text_encoder/model.safetensors is not SD-1.5's CLIP-L text encoder", "missing text_model."),
    ),
    Hostile(
        "arch-qformer-holds-text-encoder",
        "qformer",
        weights_of("text_encoder", "model.safetensors", "model.safetensors"),
        ("qformer/model.safetensors does not match the expected model", "unexpected: text_model."),
    ),
    Hostile(
        "arch-vae-holds-unet",
        "vae",
        weights_of("unet", UNET_W, UNET_W),
        (f"vae/{UNET_W} holds no VAE that ComfyUI recognises", "AutoencoderKL"),
    ),
]
rows(*(case.id for case in HOSTILE))


@pytest.fixture(scope="module")
def markers(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def hostile_models(comfy_base, tiny_model, markers):
    """Every hostile folder (the tiny model's parts linked, one part missing or replaced); removed afterwards."""
    models = comfy_base / "models" / "blip_diffusion"
    tiny = models / tiny_model
    made = []
    for case in HOSTILE:
        folder = models / case.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        made.append(folder)
        for item in tiny.iterdir():
            if item.name != case.part:
                (folder / item.name).symlink_to(item)
        if case.write is not None:
            case.write(folder / case.part, tiny, markers / f"pwned-{case.id}")
    yield {case.id: case.name for case in HOSTILE}
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_pickle_payload_is_live(tmp_path):
    """Control for the pickle cases: loaded unsafely, the payload does create its marker."""
    bomb, marker = tmp_path / "bomb.bin", tmp_path / "pwned"
    pickle_bomb(bomb, marker)
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(bomb)!r}, weights_only=False)"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert marker.exists()


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.id)
def test_hostile_model_folder(comfy, tiny_model, hostile_models, markers, case):
    graph = small(hostile_models[case.id], prefix="rel_hostile")
    # Not run (no output uses it), but in the prompt: ComfyUI keeps the tiny model's loaded outputs cached
    # for the health check instead of loading it again after every case.
    graph.add("BlipDiffusionLoader", "99", model_name=tiny_model, weight_dtype="auto")
    if case.expected:
        message = failed(comfy, graph, "BlipDiffusionLoader", *case.expected)
        assert hostile_models[case.id] in message  # names the folder
    else:  # documented: the pack does not read tokenizer/ (ComfyUI's SD-1.5 tokenizer is the release's)
        assert comfy.image(comfy.run_ok(graph), "9").shape == (64, 64, 3)
    assert not any(markers.iterdir()), "a weights file ran code"
    healthy(comfy, tiny_model)


@covers("model-no-index")
def test_folder_without_model_index_is_refused_before_queueing(comfy, comfy_base, tiny_model):
    folder = comfy_base / "models" / "blip_diffusion" / "rel-model-no-index"
    folder.mkdir()
    try:
        for item in (comfy_base / "models" / "blip_diffusion" / tiny_model).iterdir():
            if item.name != "model_index.json":
                (folder / item.name).symlink_to(item)
        rejected(comfy, small(folder.name), "1", "model_name", "'rel-model-no-index'", "has no model_index.json")
    finally:
        shutil.rmtree(folder)
    healthy(comfy, tiny_model)


@covers("encoder-file-other-kind")
def test_subject_encoder_file_of_another_kind(comfy, comfy_base, tiny_model):
    """A single weights file in models/blip_diffusion is listed for the Subject Encoder Loader; a LoRA is not one."""
    path = comfy_base / "models" / "blip_diffusion" / "rel-lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, str(path))
    try:
        failed(
            comfy,
            previewed("BlipDiffusionSubjectEncoderLoader", model_name=path.name, weight_dtype="auto"),
            "BlipDiffusionSubjectEncoderLoader",
            "rel-lora.safetensors does not match the expected model",
            "missing: ",
            "unexpected: lora_unet_",
        )
    finally:
        path.unlink()
    healthy(comfy, tiny_model)


# --- widget values refused before queueing (HTTP 400) ----------------------------------------------

NAMES = [  # (row, node class, model_name, expected)
    (
        "loader-name-dotdot",
        "BlipDiffusionLoader",
        "../blip_diffusion_subjects",
        (
            "model_name: BLIP-Diffusion model '../blip_diffusion_subjects' must be a name inside models/blip_diffusion",
            "not a path",
        ),
    ),
    ("loader-name-absolute", "BlipDiffusionLoader", "/etc", ("'/etc' must be a name inside models/blip_diffusion",)),
    (
        "loader-name-missing",
        "BlipDiffusionLoader",
        "rel-not-there",
        (
            "'rel-not-there' not found in models/blip_diffusion (searched: ",
            "; download the whole repository, with its sub-folders, from https://huggingface.co/Salesforce/blipdiffusion"
            " into models/blip_diffusion/blipdiffusion/",
        ),
    ),
    (
        "encoder-loader-name-dotdot",
        "BlipDiffusionSubjectEncoderLoader",
        "../../user/x.safetensors",
        ("model_name: subject encoder '../../user/x.safetensors' must be a name inside models/blip_diffusion",),
    ),
]
rows(*(row for row, *_ in NAMES))


@pytest.mark.parametrize("row, node, name, expected", NAMES, ids=[n[0] for n in NAMES])
def test_loader_names_outside_the_model_folder(comfy, row, node, name, expected):
    rejected(comfy, previewed(node, model_name=name, weight_dtype="auto"), "1", "model_name", *expected)


STALE = [  # (row, node id in zero_shot, input, value, choice that the message lists)
    ("combo-weight-dtype", "1", "weight_dtype", "fp8", "auto, fp32, fp16, bf16"),
    ("combo-preprocess", "3", "preprocess", "center", "squash, crop"),
    ("combo-multi-image", "4", "multi_image", "per_latent", "average, per latent"),
    ("combo-sampler", "7", "sampler_name", "plms", "pndm, reference_ddim, euler"),
    ("combo-scheduler", "7", "scheduler", "pndm", "reference, simple"),
]
rows(*(row for row, *_ in STALE))


@pytest.mark.parametrize("row, node, input_name, value, choices", STALE, ids=[s[0] for s in STALE])
def test_stale_combo_values_are_refused(comfy, tiny_model, row, node, input_name, value, choices):
    """ComfyUI 0.3.75 does not check V3 combo values; the pack's nodes do (a typo or another version's choice)."""
    graph = small(tiny_model)
    graph[node]["inputs"][input_name] = value
    rejected(comfy, graph, node, input_name, f"{input_name}: {value!r} is not one of the choices ({choices}")


@covers("sampler-steps-zero")
def test_zero_steps_are_refused(comfy, tiny_model):
    rejected(comfy, small(tiny_model, steps=0), "7", "steps", "steps: 0 is below the minimum of 1")


@covers("subject-empty", "subject-whitespace")
@pytest.mark.parametrize("subject", ["", " \t\n "], ids=["subject-empty", "subject-whitespace"])
def test_empty_subject_is_refused(comfy, tiny_model, subject):
    rejected(
        comfy,
        small(tiny_model, subject=subject),
        "3",
        "subject",
        "subject: the category is empty",
        "name what the image shows",
    )


def test_healthy_after_the_refused_values(comfy, tiny_model):
    """The HTTP 400 cases above queue nothing; the server still runs the next prompt."""
    healthy(comfy, tiny_model)


# --- text: lengths and scripts -------------------------------------------------------------------

WORDS = ("red", "blue", "green", "small", "big", "old", "new", "happy")  # one CLIP token each


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


LENGTHS = (0, 80, 300, 2000)
TEXT_FIT = 57  # BLIP-Diffusion keeps 59 text tokens: "a", the category ("cat"), then 57 of the prompt


@pytest.fixture(scope="module")
def text_run(comfy, comfy_base, tiny_model):
    """One graph: a fused prompt and a negative of each length (probed), sampled with the longest of both."""
    vocab = json.loads((comfy_base / "models" / "blip_diffusion" / tiny_model / "tokenizer" / "vocab.json").read_text())
    assert all(f"{word}</w>" in vocab for word in WORDS)  # whole words of CLIP's BPE: words(n) is n tokens
    graph = small(tiny_model, prompt=words(2000), negative=words(2000), prefix="rel_long_text")
    for i, n in enumerate((*LENGTHS, TEXT_FIT)):
        graph.add("BlipDiffusionMultimodalPromptFuse", f"3{i}", **{**graph["4"]["inputs"], "prompt": words(n)})
        probe(graph, f"4{i}", f"rel_prompt_{n}", conditioning=[f"3{i}", 0])
        graph.add("CLIPTextEncode", f"5{i}", clip=["1", 1], text=words(n))
        probe(graph, f"6{i}", f"rel_negative_{n}", conditioning=[f"5{i}", 0])
    entry = comfy.run_ok(graph)
    return {
        "image": comfy.image(entry, "9"),
        **{
            f"{kind}_{n}": comfy.probe(f"rel_{kind}_{n}")[0]["cond0"]
            for kind in ("prompt", "negative")
            for n in (*LENGTHS, TEXT_FIT)
        },
    }


@covers(*(f"prompt-{n}" for n in LENGTHS))
@pytest.mark.parametrize("n", LENGTHS, ids=[f"prompt-{n}" for n in LENGTHS])
def test_prompt_of_any_length(text_run, n):
    """Documented: only the first 59 text tokens fit next to the 16 subject vectors; the rest is dropped."""
    cond = text_run[f"prompt_{n}"]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    if n == 0:  # the text is then "a cat", repeated
        assert not torch.equal(cond, text_run[f"prompt_{TEXT_FIT}"])
    else:  # exactly the conditioning of the prompt's first 57 tokens
        assert torch.equal(cond, text_run[f"prompt_{TEXT_FIT}"])
    assert text_run["image"].shape == (64, 64, 3)  # sampled with the 2,000-token prompt


@covers(*(f"negative-{n}" for n in LENGTHS))
@pytest.mark.parametrize("n", LENGTHS, ids=[f"negative-{n}" for n in LENGTHS])
def test_negative_of_any_length(text_run, n):
    """Documented: the negative is a stock CLIPTextEncode; ComfyUI encodes it in 75-token chunks."""
    cond = text_run[f"negative_{n}"]
    assert cond.shape == (1, 77 * max(1, math.ceil(n / 75)), 768) and torch.isfinite(cond).all()
    assert text_run["image"].shape == (64, 64, 3)  # sampled with the 2,000-token negative


@covers("text-non-ascii")
def test_non_ascii_text_everywhere(comfy, tiny_model):
    subject = "chat noir 🐈 猫"
    graph = small(
        tiny_model,
        subject=subject,
        prompt="nage sous l'eau, 水中で泳ぐ 🐟 עברית",
        target="Kätzchen",
        negative="schlecht, 悪い 👎",
        prefix="rel_non_ascii",
    )
    probe(graph, "20", "rel_non_ascii", subject=["3", 0])
    entry = comfy.run_ok(graph)
    assert comfy.image(entry, "9").shape == (64, 64, 3)
    assert comfy.probe("rel_non_ascii")[1]["category"] == subject


# --- subject images and masks ------------------------------------------------------------------------


def png16(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def images(comfy):
    """Test images in the input folder (what LoadImage reads); removed afterwards."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (96, 80), dtype=np.uint8)
    wide = rng.integers(0, 65536, (96, 80, 3), dtype=np.uint16)
    y, x = np.mgrid[0:4096, 0:4096]
    made = {
        "1x1": Image.fromarray(np.array([[[200, 30, 40]]], np.uint8)),
        "8x8": Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
        "4096": Image.fromarray(np.stack([x // 16, y // 16, (x + y) // 32], -1).astype(np.uint8)),
        "gray": Image.fromarray(gray),
        "gray_as_rgb": Image.fromarray(np.repeat(gray[..., None], 3, -1)),
        "rgba": Image.fromarray(np.concatenate([rgb, rng.integers(0, 256, (96, 80, 1), dtype=np.uint8)], -1)),
        "rgb": Image.fromarray(rgb),
        "gray16": Image.fromarray(rng.integers(0, 65536, (96, 80), dtype=np.uint16)),
        "rgb16_high_bytes": Image.fromarray((wide >> 8).astype(np.uint8)),
    }
    names = {}
    for key, image in made.items():
        names[key] = f"rel_{key}.png"
        image.save(comfy.base / "input" / names[key], compress_level=1)
    names["rgb16"] = "rel_rgb16.png"
    png16(comfy.base / "input" / names["rgb16"], wide)
    yield names
    for name in names.values():
        (comfy.base / "input" / name).unlink(missing_ok=True)


class Encodings(SubjectGraph):
    """Encodes images as "cat", probing each subject."""

    def __init__(self, model: str):
        super().__init__(model)
        self.probes: list[str] = []

    def encode(self, image: list, preprocess: str = "squash", **mask) -> list:
        """Encode `image` as a "cat" and probe the subject (`run` returns the subjects in this order)."""
        subject = super().encode(image, "cat", preprocess, **mask)
        self.probes.append(f"rel_subject_{len(self.probes)}")
        probe(self, None, self.probes[-1], subject=subject)
        return subject

    def run(self, comfy) -> list[torch.Tensor]:
        """Run it; the subject embeddings in the order encoded, each checked to be one finite [1,16,768]."""
        comfy.run_ok(self)
        found = [comfy.probe(name)[0]["subject"] for name in self.probes]
        for subject in found:
            assert subject.shape == (1, 16, 768) and torch.isfinite(subject).all()
        return found


def encoded(comfy, tiny_model, *names: str, preprocess: str = "squash") -> list[torch.Tensor]:
    g = Encodings(tiny_model)
    for name in names:
        g.encode(g.image(name), preprocess)
    return g.run(comfy)


@covers("image-1x1")
def test_one_pixel_subject(comfy, tiny_model, images):
    """Documented: any size works; both preprocess modes resize to 224x224."""
    encoded(comfy, tiny_model, images["1x1"], preprocess="squash")
    encoded(comfy, tiny_model, images["1x1"], preprocess="crop")


@covers("image-8x8")
def test_tiny_subject(comfy, tiny_model, images):
    encoded(comfy, tiny_model, images["8x8"])


@covers("image-4096")
def test_huge_subject(comfy, tiny_model, images):
    start = time.monotonic()
    encoded(comfy, tiny_model, images["4096"])
    print(f"4096x4096 subject image encoded in {time.monotonic() - start:.1f}s")


@covers("image-gray")
def test_gray_subject_means_its_rgb_copy(comfy, tiny_model, images):
    gray, rgb = encoded(comfy, tiny_model, images["gray"], images["gray_as_rgb"])
    assert torch.equal(gray, rgb)


@covers("image-rgba-file")
def test_rgba_file_alpha_is_dropped(comfy, tiny_model, images):
    """LoadImage turns the alpha channel into its MASK output; the subject sees the RGB pixels."""
    rgba, rgb = encoded(comfy, tiny_model, images["rgba"], images["rgb"])
    assert torch.equal(rgba, rgb)


@covers("image-rgba-tensor")
def test_rgba_image_tensor_alpha_is_dropped(comfy, tiny_model, images):
    """A 4-channel IMAGE (stock JoinImageWithAlpha): the encoder ignores alpha, as the reference does."""
    g = Encodings(tiny_model)
    rgb = g.image(images["rgb"])
    alpha = g.add("SolidMask", value=0.3, width=80, height=96)
    g.encode(g.add("JoinImageWithAlpha", image=rgb, alpha=alpha))
    g.encode(rgb)
    with_alpha, without = g.run(comfy)
    assert torch.equal(with_alpha, without)


@covers("image-16bit-gray")
def test_16_bit_gray_subject(comfy, tiny_model, images):
    """Works, but ComfyUI's LoadImage converts 16-bit gray with Pillow, which clips to white (documented)."""
    g = Encodings(tiny_model)
    image = g.image(images["gray16"])
    g.encode(image)
    g.add("ProbeSaveTensors", name="rel_gray16", image=image)
    g.run(comfy)
    assert comfy.probe("rel_gray16")[0]["image"].mean() > 0.95


@covers("image-16bit-rgb")
def test_16_bit_rgb_subject_means_its_8_bit_copy(comfy, tiny_model, images):
    wide, narrow = encoded(comfy, tiny_model, images["rgb16"], images["rgb16_high_bytes"])
    assert torch.equal(wide, narrow)


@covers("mask-other-size")
def test_mask_of_another_size_is_resized(comfy, tiny_model):
    """An all-ones mask keeps the photo exactly; an all-zeros one paints it all white, whatever their size."""
    g = Encodings(tiny_model)
    cat = g.image(CAT)  # 451x300
    g.encode(cat)
    g.encode(cat, mask=g.add("SolidMask", value=1.0, width=64, height=48))
    g.encode(cat, mask=g.add("SolidMask", value=0.0, width=17, height=5))
    g.encode(g.add("EmptyImage", width=451, height=300, batch_size=1, color=0xFFFFFF))
    no_mask, ones, zeros, white = g.run(comfy)
    assert torch.equal(ones, no_mask) and torch.equal(zeros, white)


@covers("mask-batch-mismatch")
def test_mask_batch_mismatch(comfy, tiny_model):
    g = Encodings(tiny_model)
    cat = g.image(CAT)
    masks = g.add(
        "ImageToMask",
        channel="red",
        image=g.add(
            "RepeatImageBatch",
            amount=3,
            image=g.add("MaskToImage", mask=g.add("SolidMask", value=1.0, width=64, height=64)),
        ),
    )
    g.encode(g.add("RepeatImageBatch", image=cat, amount=2), mask=masks)
    failed(
        comfy,
        g,
        "BlipDiffusionSubjectEncoder",
        "mask: 3 masks for 2 subject images",
        "expected 1 mask (used for every image) or one per image",
    )
    healthy(comfy, tiny_model)


# --- latents ---------------------------------------------------------------------------------------


@covers("latent-not-multiple-of-8")
@pytest.mark.parametrize("width, height, expected", [(100, 68, (64, 96)), (72, 88, (88, 72))])
def test_latent_sizes(comfy, tiny_model, width, height, expected):
    """Documented: EmptyLatentImage rounds down to multiples of 8; odd latent sizes (9x11) sample fine."""
    graph = small(tiny_model, prefix="rel_sizes")
    graph["6"]["inputs"].update(width=width, height=height)
    assert comfy.image(comfy.run_ok(graph), "9").shape == (*expected, 3)


@covers("batch-mismatch-per-latent")
def test_three_subject_images_per_latent_for_two_latents(comfy, tiny_model):
    graph = small(tiny_model, batch=2, multi_image="per latent")
    graph.add("RepeatImageBatch", "11", image=["2", 0], amount=3)
    graph["3"]["inputs"]["image"] = ["11", 0]
    failed(
        comfy,
        graph,
        "BlipDiffusionSampler",
        "positive: a conditioning of batch 3 cannot be paired with 2 latents",
        "multi_image 'per latent'",
        "3 subject images for 2 latents",
        "give as many images as latents",
    )
    healthy(comfy, tiny_model)


# --- subject files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def subject_folder(comfy):
    folder = comfy.base / "models" / "blip_diffusion_subjects"
    folder.mkdir(parents=True, exist_ok=True)
    made = [folder / "rel_lora.safetensors", folder / "rel_evil.pt"]
    yield folder
    for path in made:
        path.unlink(missing_ok=True)


@covers("subject-file-dotdot", "subject-file-absolute", "subject-file-input-dotdot")
@pytest.mark.parametrize(
    "name",
    [
        "../blip_diffusion/blipdiffusion/unet/diffusion_pytorch_model.safetensors",
        "{unet}",  # the absolute path of a file that exists
        "../models/blip_diffusion/blipdiffusion/unet/diffusion_pytorch_model.safetensors [input]",
    ],
    ids=["subject-file-dotdot", "subject-file-absolute", "subject-file-input-dotdot"],
)
def test_subject_file_names_outside_the_folders(comfy, tiny_model, name):
    unet = comfy.base / "models" / "blip_diffusion" / tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    name = name.format(unet=unet)
    rejected(comfy, loaded_subject(name), "1", "subject_file", "must be a name inside", "not a path")


@covers("subject-file-not-subject")
def test_subject_file_of_another_kind(comfy, tiny_model, subject_folder):
    save_file(
        {"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)},
        str(subject_folder / "rel_lora.safetensors"),
        metadata={"ss_network_module": "networks.lora"},
    )
    failed(
        comfy,
        loaded_subject("rel_lora.safetensors"),
        "BlipDiffusionLoadSubject",
        "rel_lora.safetensors is not a BLIP-Diffusion subject file: expected metadata format='blip_diffusion_subject'",
    )
    healthy(comfy, tiny_model)


@covers("subject-file-pickle")
def test_pickle_subject_file_is_never_opened(comfy, tiny_model, subject_folder, markers):
    pickle_bomb(subject_folder / "rel_evil.pt", markers / "pwned-subject")
    rejected(
        comfy,
        loaded_subject("rel_evil.pt"),
        "1",
        "subject_file",
        "expected a .safetensors subject file",
        "never pickle",
    )
    assert not any(markers.iterdir())


@covers("save-prefix-escape")
def test_save_subject_outside_the_output_folder(comfy, tiny_model):
    graph = Graph({k: v for k, v in small(tiny_model).items() if k in ("1", "2", "3")})  # the save is the only output
    graph.add("BlipDiffusionSaveSubject", "12", subject=["3", 0], filename_prefix="../../rel_escape")
    rejected(comfy, graph, "12", "filename_prefix", "expected a name inside the output folder")
    healthy(comfy, tiny_model)
    assert not list(comfy.base.parent.glob("rel_escape*")) and not list(comfy.base.glob("rel_escape*"))


# --- cancel and the queue ------------------------------------------------------------------------


async def run_and_interrupt(comfy, prompt: dict, at_step: int, node: str = "7") -> tuple[str, list[int]]:
    """Queue `prompt`, press Cancel (POST /interrupt) once `node` reports `at_step`; (end event, steps seen)."""
    client_id = str(uuid.uuid4())
    steps = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{comfy.url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
            status, body = await asyncio.to_thread(comfy.submit, prompt, client_id)
            assert status == 200, body
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue  # previews
                event = json.loads(message.data)
                data = event.get("data", {})
                if data.get("prompt_id") not in (None, body["prompt_id"]):
                    continue
                if event["type"] == "progress" and data["node"] == node:
                    steps.append(data["value"])
                    if data["value"] == at_step:
                        await asyncio.to_thread(comfy.request, "POST", "/interrupt", {})
                if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    return event["type"], steps
    raise AssertionError("the websocket closed before the prompt ended")


@covers("cancel-mid-sampling")
def test_cancel_mid_sampling_then_a_normal_prompt(comfy, tiny_model):
    end, steps = asyncio.run(run_and_interrupt(comfy, small(tiny_model, size=256, steps=40), at_step=2))
    assert end == "execution_interrupted" and 2 <= max(steps) < 40
    healthy(comfy, tiny_model)
    assert comfy.get_json("/queue") == {"queue_running": [], "queue_pending": []}


def rss(comfy) -> int:
    return psutil.Process(comfy.pid).memory_info().rss


@covers("queue-mixed-30")
def test_queue_of_30_mixed_prompts(comfy, tiny_model, hostile_models):
    """30 prompts submitted at once: each valid one saves its image, each invalid one gets its own error,
    and the server's resident memory after a warm-up of 10 grows by less than 200 MB over the last 20."""

    def valid(i):
        return small(tiny_model, prefix=f"rel_queue_{i:02}"), None

    def empty_subject(i):
        return small(tiny_model, subject=" "), ("400", "3", "the category is empty")

    def stale_scheduler(i):
        graph = small(tiny_model)
        graph["7"]["inputs"]["scheduler"] = "nope"
        return graph, ("400", "7", "scheduler: 'nope' is not one of the choices")

    def incomplete_model(i):
        return small(hostile_models["model-no-vae"]), ("runtime", "BlipDiffusionLoader", "missing vae/")

    def per_latent_mismatch(i):
        graph = small(tiny_model, batch=2, multi_image="per latent")
        graph.add("RepeatImageBatch", "11", image=["2", 0], amount=3)
        graph["3"]["inputs"]["image"] = ["11", 0]
        return graph, ("runtime", "BlipDiffusionSampler", "3 subject images for 2 latents")

    kinds = [
        valid,
        valid,
        empty_subject,
        valid,
        incomplete_model,
        valid,
        stale_scheduler,
        valid,
        per_latent_mismatch,
        valid,
    ]  # 18 valid, 6 refused (HTTP 400), 6 runtime errors
    submitted = []  # (index, expectation, http status, body)
    for i in range(30):
        prompt, expect = kinds[i % len(kinds)](i)
        status, body = comfy.submit(prompt)
        submitted.append((i, expect, status, body))

    samples, done = [], threading.Event()

    def sample():  # the server's RSS while the queue runs
        while not done.is_set():
            samples.append(rss(comfy))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    warm = None
    try:
        for i, expect, status, body in submitted:
            if expect is not None and expect[0] == "400":
                assert status == 400 and list(body["node_errors"]) == [expect[1]], body
                assert expect[2] in json.dumps(body["node_errors"])
            else:
                assert status == 200, body
                entry = comfy.wait(body["prompt_id"])
                if expect is None:
                    assert entry["status"]["status_str"] == "success", execution_error(entry)
                    [image] = entry["outputs"]["9"]["images"]
                    assert image["filename"].startswith(f"rel_queue_{i:02}_")
                    assert comfy.image(entry, "9").shape == (64, 64, 3)
                else:
                    error = execution_error(entry)
                    assert error and error["node_type"] == expect[1] and expect[2] in error["exception_message"]
            if i == 9:
                warm, warm_samples = rss(comfy), len(samples)
    finally:
        done.set()
        sampler.join()
    end = rss(comfy)
    peak = max(samples[warm_samples:], default=end)
    mb = 1 << 20
    print(
        f"server RSS: after warm-up (10 prompts) {warm / mb:.0f} MB, after 30 {end / mb:.0f} MB, "
        f"peak over the last 20 {peak / mb:.0f} MB, growth {(end - warm) / mb:+.0f} MB"
    )
    assert end - warm < 200 * mb
    healthy(comfy, tiny_model)


# --- DDIM inversion --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo(comfy) -> str:
    """A 64x64 photo (the cat) in the input folder."""
    image = Image.open(comfy.base / "input" / CAT).convert("RGB").resize((64, 64))
    return comfy.put_input("rel_inversion.png", np.asarray(image))


@covers("inversion-latent-empty")
def test_inverting_an_empty_latent(comfy, tiny_model, photo):
    graph = inversion(tiny_model, photo, steps=2)
    graph["6"]["inputs"]["latent"] = graph.add("ProbeEmptyLatent")
    failed(
        comfy,
        graph,
        "BlipDiffusionDDIMInversion",
        "latent: expected a batch of image latents [B,4,H,W]",
        "got shape (0, 4, 8, 8)",
    )
    healthy(comfy, tiny_model)


@covers("inversion-steps-zero")
def test_inversion_with_zero_steps(comfy, tiny_model, photo):
    graph = inversion(tiny_model, photo, steps=2)
    graph["6"]["inputs"]["steps"] = 0
    rejected(comfy, graph, "6", "steps", "Value 0 smaller than min of 1")


@covers("inversion-batch-mismatch")
def test_inversion_batch_against_conditioning_batch(comfy, tiny_model, photo):
    """Three photos against a conditioning of two (a per-latent Multimodal Prompt of two subject images)."""
    graph = inversion(tiny_model, photo, steps=2)
    graph["6"]["inputs"]["latent"] = graph.add("RepeatLatentBatch", samples=["3", 0], amount=3)
    subject = graph.add(
        "BlipDiffusionSubjectEncoder",
        subject_encoder=["1", 3],
        subject="cat",
        preprocess="squash",
        image=graph.add("RepeatImageBatch", image=["2", 0], amount=2),
    )
    graph["6"]["inputs"]["positive"] = graph.add(
        "BlipDiffusionMultimodalPromptFuse",
        clip=["1", 1],
        subject=subject,
        prompt="on a sofa",
        target_subject="",
        prompt_strength=1.0,
        prompt_reps=20,
        multi_image="per latent",
    )
    failed(
        comfy,
        graph,
        "BlipDiffusionDDIMInversion",
        "positive: a conditioning of batch 2 cannot be paired with 3 latents",
    )
    healthy(comfy, tiny_model)


@covers("inversion-cfg-without-negative")
def test_inversion_guidance_without_a_negative(comfy, tiny_model, photo):
    graph = inversion(tiny_model, photo, steps=2)
    graph["6"]["inputs"]["cfg"] = 2.0
    failed(comfy, graph, "BlipDiffusionDDIMInversion", "negative: cfg 2.0 needs a negative prompt")
    healthy(comfy, tiny_model)


@covers("inversion-then-denoise")
def test_inverted_latent_with_partial_denoise(comfy, tiny_model, photo):
    graph = inversion(tiny_model, photo, steps=2)
    graph["7"]["inputs"]["denoise"] = 0.5
    failed(
        comfy, graph, "BlipDiffusionSampler", "denoise: latent_image is a DDIM inversion's result", "use denoise 1.0"
    )
    healthy(comfy, tiny_model)


@covers("inversion-other-steps")
def test_inverted_latent_with_other_steps(comfy, tiny_model, photo):
    graph = inversion(tiny_model, photo, steps=2)
    graph["7"]["inputs"]["steps"] = 3
    failed(
        comfy,
        graph,
        "BlipDiffusionSampler",
        "steps: latent_image was inverted with 2 steps",
        "sample with 2 steps and the reference scheduler",
    )
    healthy(comfy, tiny_model)


@covers("inversion-v-prediction")
def test_inverting_with_a_v_prediction_model(comfy, tiny_model, photo):
    """Stock ModelSamplingDiscrete makes the MODEL v-prediction: the reference maths would be wrong, so refused."""
    graph = inversion(tiny_model, photo, steps=2)
    graph["6"]["inputs"]["model"] = graph.add(
        "ModelSamplingDiscrete", model=["1", 0], sampling="v_prediction", zsnr=False
    )
    failed(comfy, graph, "BlipDiffusionDDIMInversion", "needs an epsilon-prediction model", "v-prediction")
    healthy(comfy, tiny_model)


@covers("inversion-stock-ksampler")
def test_inverted_latent_in_a_stock_ksampler(comfy, tiny_model, photo):
    """Documented: a stock KSampler adds its own noise to any latent; from an inverted one at denoise 1 that
    noise dominates (a new picture, not the photo). SamplerCustom with add_noise off starts from it."""
    graph = inversion(tiny_model, photo, steps=2)
    graph.add(
        "KSampler",
        "7",
        model=["1", 0],
        positive=["4", 0],
        negative=["5", 0],
        latent_image=["6", 0],
        seed=1,
        steps=2,
        cfg=7.5,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    assert comfy.image(comfy.run_ok(graph), "9").shape == (64, 64, 3)


@covers("inversion-cancel")
def test_cancel_mid_inversion_then_a_normal_prompt(comfy, tiny_model, photo):
    graph = inversion(tiny_model, photo, steps=40)
    graph.add(
        "ImageScale",
        "2",
        image=graph.add("LoadImage", "12", image=photo),
        upscale_method="bicubic",
        width=256,
        height=256,
        crop="disabled",
    )
    end, steps = asyncio.run(run_and_interrupt(comfy, graph, at_step=2, node="6"))
    assert end == "execution_interrupted" and 2 <= max(steps) < 40
    healthy(comfy, tiny_model)
    assert comfy.get_json("/queue") == {"queue_running": [], "queue_pending": []}


# --- ControlNet ------------------------------------------------------------------------------------


def controlled(
    model: str, control=("30", 0), batch: int = 1, start: float = 0.0, end: float = 1.0, controlnet: str | None = None
) -> dict:
    """small() with a ControlNet (the tiny model's, or `controlnet` from models/controlnet) on `control`."""
    graph = small(model, batch=batch, prefix="rel_cn")
    graph.add("LoadImage", "30", image="blipd_example_cup.jpg")
    graph.add("BlipDiffusionControlNetLoader", "31", model_name=controlnet or model)
    graph.add(
        "BlipDiffusionControlNetApply",
        "32",
        positive=["4", 0],
        negative=["5", 0],
        control_net=["31", 0],
        image=list(control),
        strength=1.0,
        start_percent=start,
        end_percent=end,
    )
    graph["7"]["inputs"].update(positive=["32", 0], negative=["32", 1])
    return graph


@covers("cn-loader-dotdot")
def test_controlnet_name_outside_its_folder(comfy, tiny_model):
    rejected(
        comfy,
        controlled(tiny_model, controlnet="../blip_diffusion/" + tiny_model),
        "31",
        "model_name",
        "must be a name inside models/controlnet",
    )
    healthy(comfy, tiny_model)


@covers("cn-weights-pickle")
def test_controlnet_pickle_is_never_run(comfy, comfy_base, tiny_model, tmp_path):
    folder = comfy_base / "models" / "controlnet" / "rel-cn-pickle"
    folder.mkdir(parents=True)
    marker = tmp_path / "controlnet-pickle-ran"
    try:
        shutil.copy(comfy_base / "models" / "blip_diffusion" / tiny_model / "controlnet" / "config.json", folder)
        pickle_bomb(folder / "diffusion_pytorch_model.bin", marker)
        failed(
            comfy,
            controlled(tiny_model, controlnet="rel-cn-pickle/diffusion_pytorch_model.bin"),
            "BlipDiffusionControlNetLoader",
            "refused to load",
            "diffusion_pytorch_model.bin",
            "weights_only=True",
        )
    finally:
        shutil.rmtree(folder)
    assert not marker.exists()
    healthy(comfy, tiny_model)


@covers("cn-architecture-sdxl")
def test_controlnet_of_another_architecture(comfy, comfy_base, tiny_model):
    from blip_diffusion_nodes.tools.make_tiny_model import controlnet_config, diffusers_shapes, state_dict

    folder = comfy_base / "models" / "controlnet" / "rel-cn-2048"
    folder.mkdir(parents=True)
    try:
        config = {**controlnet_config("tiny"), "cross_attention_dim": 2048}  # SDXL's text width
        (folder / "config.json").write_text(json.dumps(config))
        save_file(
            state_dict(diffusers_shapes(config), 2, torch.float16, "controlnet"),
            str(folder / "diffusion_pytorch_model.safetensors"),
        )
        failed(
            comfy,
            controlled(tiny_model, controlnet="rel-cn-2048/diffusion_pytorch_model.safetensors"),
            "BlipDiffusionControlNetApply",
            "cross-attends to 2048-wide",
            "768",
        )
    finally:
        shutil.rmtree(folder)
    healthy(comfy, tiny_model)


@covers("cn-image-batch-mismatch")
def test_control_images_for_other_latent_count(comfy, tiny_model):
    graph = controlled(tiny_model, control=("33", 0), batch=3)
    graph.add("ImageBatch", "33", image1=["30", 0], image2=["30", 0])
    failed(
        comfy,
        graph,
        "BlipDiffusionSampler",
        "image is a batch of 2 control images",
        "3 latents",
        "give 1 control image (for all) or one per latent",
    )
    healthy(comfy, tiny_model)


@covers("cn-image-gray", "cn-image-rgba")
@pytest.mark.parametrize("mode", ["gray", "rgba"], ids=["cn-image-gray", "cn-image-rgba"])
def test_gray_and_rgba_control_images(comfy, tiny_model, mode):
    graph = controlled(tiny_model, control=("33", 0))
    graph.add("ProbeImageChannels", "33", image=["30", 0], mode=mode)
    assert comfy.image(comfy.run_ok(graph), "9").shape == (64, 64, 3)


@covers("cn-start-after-end")
def test_control_window_that_ends_before_it_starts(comfy, tiny_model):
    rejected(
        comfy,
        controlled(tiny_model, start=0.8, end=0.2),
        "32",
        "start_percent",
        "start_percent: 0.8 is after end_percent 0.2: the window is empty",
    )


@covers("cn-annotator-missing")
def test_hed_annotator_without_its_file(comfy, comfy_base, tiny_model):
    folder = comfy_base / "models" / "annotators" / "rel-empty-annotators"
    folder.mkdir(parents=True)
    try:
        graph = edges(
            "BlipDiffusionHEDEdges",
            "blipd_example_cup.jpg",
            annotator=folder.name,
            scribble=False,
            safe=False,
            resolution=128,
        )
        rejected(
            comfy,
            graph,
            "2",
            "annotator",
            f"no ControlNetHED.pth in {folder}; download it from https://huggingface.co/lllyasviel/Annotators into",
        )
    finally:
        shutil.rmtree(folder)
    healthy(comfy, tiny_model)
