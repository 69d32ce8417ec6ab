"""The ControlNet hint (control image) as the reference prepares it.

diffusers' BlipDiffusionControlNetPipeline converts the control image to RGB, resizes it
with PIL bicubic on the 8-bit image straight to the output (width, height), ignoring the
aspect ratio, and rescales it to 0..1 with transformers' arithmetic. It is not normalized.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .preprocess import to_rgb, to_uint8


def resize_control_image(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B,H,W,C] in 0..1 -> [B,height,width,3] float32, bit-exact with the reference.

    An image already at the size is returned as it is (only made RGB): the reference's
    same-size PIL resize is a copy, and skipping the 8-bit round trip keeps float inputs exact.
    """
    images = to_rgb(images)
    if tuple(images.shape[1:3]) == (height, width):
        return images
    resized = [
        np.asarray(Image.fromarray(arr).resize((width, height), Image.BICUBIC, reducing_gap=None))
        for arr in to_uint8(images)
    ]
    # transformers rescales in float64 and casts to float32
    pixels = (np.stack(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy(pixels).to(images.device)
