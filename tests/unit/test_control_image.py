"""blip_core.resize_control_image against the reference's own control-image preprocessing
(diffusers' BlipImageProcessor called as BlipDiffusionControlNetPipeline.prepare_control_image does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blip_diffusion_nodes.blip_core.control import resize_control_image


def pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reference(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor

    out = BlipImageProcessor().preprocess(
        Image.fromarray(image),
        size={"width": width, "height": height},
        do_rescale=True,
        do_center_crop=False,
        do_normalize=False,
        return_tensors="pt",
    )["pixel_values"]
    return out.movedim(1, -1)


@pytest.mark.parametrize("size,target", [((70, 100), (64, 96)), ((48, 40), (128, 128)), ((512, 300), (64, 64))])
def test_bit_exact_with_the_reference_resize(size, target):
    image = pixels(*size)
    ours = resize_control_image(torch.from_numpy(image)[None].float() / 255, *target)
    assert ours.dtype == torch.float32 and ours.shape == (1, *target, 3)
    assert torch.equal(ours, reference(image, *target))


def test_same_size_is_passed_through():
    image = torch.rand(2, 64, 96, 3)  # not 8-bit values: nothing is quantized
    assert torch.equal(resize_control_image(image, 64, 96), image)


def test_gray_is_repeated_and_alpha_dropped():
    image = torch.from_numpy(pixels(30, 50)).float()[None] / 255
    gray = resize_control_image(image[..., :1], 64, 96)
    assert torch.equal(gray, resize_control_image(image[..., :1].expand(-1, -1, -1, 3), 64, 96))
    rgba = torch.cat([image, torch.zeros_like(image[..., :1])], dim=-1)
    assert torch.equal(resize_control_image(rgba, 64, 96), resize_control_image(image, 64, 96))
