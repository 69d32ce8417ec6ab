"""What the pack's nodes show after a run, read from /history as the front end receives it: the Subject Encoder's
224x224 images (exactly the pixels it encoded, after the mask and the squash or crop) and the file Save Subject
wrote. tests/ui/test_frontend.py checks that the front end displays them on the nodes."""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image, ImageOps

from blip_diffusion_nodes.blip_core.preprocess import encoder_view
from blip_diffusion_nodes.tests.graphs import SubjectGraph as Graph
from blip_diffusion_nodes.tests.graphs import probe

CAT = "blipd_example_cat.jpg"


def loaded(comfy, name: str) -> torch.Tensor:
    """The IMAGE LoadImage makes of an input file: [1,H,W,3] floats in 0..1."""
    image = ImageOps.exif_transpose(Image.open(comfy.base / "input" / name)).convert("RGB")
    return torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)[None]


def previews(comfy, entry: dict, node: str) -> np.ndarray:
    shown = entry["outputs"][node]["images"]
    assert shown and all(p["type"] == "temp" for p in shown), shown  # temporary files, as PreviewImage's
    return np.stack([np.asarray(Image.open(io.BytesIO(comfy.view(p))).convert("RGB")) for p in shown])


def test_subject_encoder_shows_exactly_what_it_encoded(comfy, tiny_model):
    cat = loaded(comfy, CAT)
    height, width = cat.shape[1:3]
    g = Graph(tiny_model)
    image = g.image(CAT)
    views = g.add(
        "ImageBatch", image1=image, image2=g.add("ImageFlip", image=image, flip_method="y-axis: horizontally")
    )
    cropped = g.encode(views, preprocess="crop")
    # the left half of the photo kept, the rest whitened
    left = g.add(
        "MaskComposite",
        destination=g.add("SolidMask", value=0.0, width=width, height=height),
        source=g.add("SolidMask", value=1.0, width=width // 2, height=height),
        x=0,
        y=0,
        operation="add",
    )
    masked = g.encode(image, preprocess="squash", mask=left)
    probe(g, None, "display_cropped", subject=cropped)
    probe(g, None, "display_masked", subject=masked)
    entry = comfy.run_ok(g)

    both = torch.cat([cat, torch.flip(cat, dims=[2])])
    np.testing.assert_array_equal(previews(comfy, entry, cropped[0]), encoder_view(both, "crop"))
    mask = torch.zeros(1, height, width)
    mask[:, :, : width // 2] = 1.0
    shown = previews(comfy, entry, masked[0])
    np.testing.assert_array_equal(shown, encoder_view(cat, "squash", mask))
    assert shown.shape == (1, 224, 224, 3) and (shown[0, :, 120:] == 255).all()  # the right half is white


def test_save_subject_reports_the_file_it_wrote(comfy, tiny_model):
    g = Graph(tiny_model)
    save = g.add("BlipDiffusionSaveSubject", subject=g.encode(g.image(CAT)), filename_prefix="display/shown")
    entry = comfy.run_ok(g)
    output = entry["outputs"][save[0]]
    ((written,), (locator,)) = output["text"], output["subjects"]
    assert re.fullmatch(r"output/display/shown_\d{5}_\.safetensors", written), written
    assert written == f"output/{locator['subfolder']}/{locator['filename']}"
    assert (comfy.base / written).is_file()
