"""A fine-tuning run's loss curve as a picture (a ComfyUI IMAGE, and the preview while it trains)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 512, 320
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 28, 36
SMOOTHING = 5  # steps in the running mean: each step's loss depends on its random timesteps


def running_mean(values: list[float], window: int = SMOOTHING) -> list[float]:
    return [float(np.mean(values[max(0, i + 1 - window) : i + 1])) for i in range(len(values))]


def loss_curve_image(losses: list[float], total_steps: int | None = None) -> Image.Image:
    """Each step's loss (light) and its running mean (dark) against the step, on `total_steps` (default: as
    many as there are losses) so that a curve drawn while training grows to the right."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, top, right, bottom = MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    total = max(total_steps or len(losses), 2)
    draw.text((left, HEIGHT - 20), "step 1", fill="black", font=font)
    draw.text((right - 60, HEIGHT - 20), f"step {total}", fill="black", font=font)
    if not losses:
        draw.text((left + 8, top), "training loss (MSE on the noise)", fill="black", font=font)
        return image
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0

    def point(i: int, value: float) -> tuple[float, float]:
        return left + (right - left) * i / (total - 1), bottom - (bottom - top) * (value - low) / span

    for values, colour in ((losses, (150, 180, 230)), (running_mean(losses), (20, 60, 160))):
        if len(values) == 1:
            x, y = point(0, values[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        else:
            draw.line([point(i, v) for i, v in enumerate(values)], fill=colour, width=2)
    draw.text((4, top - 6), f"{high:.4g}", fill="black", font=font)
    draw.text((4, bottom - 6), f"{low:.4g}", fill="black", font=font)
    last = running_mean(losses)[-1]
    title = (
        f"training loss (MSE on the noise): step {len(losses)}, {losses[-1]:.4g}; mean of last {SMOOTHING}: {last:.4g}"
    )
    draw.text((left, 8), title, fill="black", font=font)
    return image


def as_comfy_image(image: Image.Image) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE: [1, H, W, 3] float32 in 0..1."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
