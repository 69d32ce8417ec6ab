"""Subject image preprocessing: ComfyUI IMAGE tensors -> CLIP-normalized 224x224 pixels.

`squash` is the diffusers reference (the released pipeline): PIL bicubic on the 8-bit
image straight to 224x224, ignoring the aspect ratio. `crop` is the original LAVIS
recipe: the short side to 224 (bicubic), then a center crop. Both use the arithmetic
of transformers' image processor so that `squash` is bit-exact with the reference.

Channels: grayscale is repeated to RGB; an alpha channel is dropped (as PIL's
`convert("RGB")` in the reference does). To remove a background, pass a mask.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
IMAGE_SIZE = 224
MODES = ("squash", "crop")


def check_images(images: torch.Tensor, name: str = "image") -> None:
    """A ComfyUI IMAGE batch [B,H,W,C] with at least one image of at least one pixel."""
    if images.ndim != 4 or 0 in images.shape[:3]:
        raise ValueError(f"{name}: expected a non-empty image batch [B,H,W,C], got shape {tuple(images.shape)}")


def to_rgb(images: torch.Tensor, name: str = "image") -> torch.Tensor:
    """[B,H,W,C] with C in 1, 3, 4 -> [B,H,W,3]."""
    check_images(images, name)
    channels = images.shape[-1]
    if channels == 1:
        return images.expand(-1, -1, -1, 3)
    if channels in (3, 4):
        return images[..., :3]
    raise ValueError(f"{name}: expected 1 (gray), 3 (RGB) or 4 (RGBA) channels, got {channels}")


def whiten_outside(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep pixels where `mask` is 1 (the subject), blend the rest to white.

    `mask` is [H,W] or [B|1,H,W] in 0..1; it is resized (bilinear) to the image size.
    """
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask: expected a MASK [H,W] or [B,H,W], got shape {tuple(mask.shape)}")
    if mask.shape[0] not in (1, images.shape[0]):
        raise ValueError(
            f"mask: {mask.shape[0]} masks for {images.shape[0]} subject images; expected 1 mask "
            "(used for every image) or one per image"
        )
    if mask.shape[1:] != images.shape[1:3]:
        mask = F.interpolate(mask[:, None].float(), size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    mask = mask.to(images).clamp(0, 1)[..., None]
    return images * mask + (1.0 - mask)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """ComfyUI's 0..1 floats back to the 8-bit values they were loaded from."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _squash(image: Image.Image) -> Image.Image:
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC, reducing_gap=None)


def _short_side_crop(image: Image.Image) -> Image.Image:
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(IMAGE_SIZE * long / short)
    size = (IMAGE_SIZE, new_long) if w <= h else (new_long, IMAGE_SIZE)
    image = image.resize(size, Image.BICUBIC)
    left = int(round((image.size[0] - IMAGE_SIZE) / 2.0))
    top = int(round((image.size[1] - IMAGE_SIZE) / 2.0))
    return image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B,224,224,3] -> float32 [B,3,224,224], as transformers rescales and normalizes."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def encoder_view(images: torch.Tensor, mode: str = "squash", mask: torch.Tensor | None = None) -> np.ndarray:
    """What the vision tower sees, before normalisation: ComfyUI IMAGE [B,H,W,C] in 0..1 -> uint8 [B,224,224,3]
    after the mask, the squash or the crop."""
    if mode not in MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {MODES}")
    images = to_rgb(images)
    if mask is not None:
        images = whiten_outside(images, mask)
    resize = _squash if mode == "squash" else _short_side_crop
    return np.stack([np.asarray(resize(Image.fromarray(arr))) for arr in to_uint8(images)])


def preprocess(images: torch.Tensor, mode: str = "squash", mask: torch.Tensor | None = None) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in 0..1 -> pixel values [B,3,224,224] for the vision tower."""
    return normalize(encoder_view(images, mode, mask))
