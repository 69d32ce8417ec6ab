"""Real photos in: DDIM inversion, the original's way (LAVIS `_ddim_inverse` = diffusers' DDIMInverseScheduler).

A photo's latent (a stock VAEEncode) is walked up SD-1.5's DDIM levels (50 steps: abar_0 -> t=1 -> 21 -> ...
-> 981), each step evaluating the noise at the level it steps to. The result is the noise that regenerates
the photo: a LATENT in ComfyUI's form of a noised latent (x0 + sigma * eps at the last level), marked so the
pack's samplers start from it without adding noise.
"""

from __future__ import annotations

import torch

from ..blip_core.sampling import DDIM_OFFSET, invert_ddim, reference_sigmas
from . import compat
from .api import CATEGORY, io, number_error
from .sampling import INVERTED, check_batches, eps_function, progress, steps_input


class ReferenceInversion(compat.Sampler):
    """DDIM inversion as a ComfyUI SAMPLER over ascending sigmas: from the clean latent, read as the VP sample
    at abar_0 (as the original does), to the VE sample at the last sigma, which it returns."""

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        extra_args["denoise_mask"] = None  # a photo inverts whole
        eps = eps_function(model_wrap, sigmas, extra_args, None, noise, "BlipDiffusionDDIMInversion")
        x = latent_image * (1 + sigmas[0] ** 2).sqrt()
        return invert_ddim(eps, x, sigmas, progress(callback, len(sigmas) - 1))


def inversion_sigmas(steps: int) -> torch.Tensor:
    """SD-1.5's DDIM levels, low to high: sigma(abar_0), sigma(1), sigma(21), ..., sigma(981) for 50 steps."""
    return reference_sigmas(steps, DDIM_OFFSET).flip(0)


class BlipDiffusionDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionDDIMInversion",
            display_name="BLIP-Diffusion DDIM Inversion",
            category=f"{CATEGORY}/sampling",
            description="Turns a photo's latent into the noise that regenerates it (DDIM inversion, as the original "
            "BLIP-Diffusion edits real photos). Start the BLIP-Diffusion Sampler (reference_ddim, the same steps) "
            "from the result: no noise is added to it.",
            inputs=[
                io.Model.Input("model", tooltip="The BLIP-Diffusion UNet (an SD-1.5 epsilon-prediction MODEL)."),
                io.Conditioning.Input(
                    "positive",
                    tooltip="A plain prompt that describes the photo, e.g. a CLIPTextEncode of 'a cat sitting on a "
                    "sofa' (the original inverts with its editing prompt, without the subject).",
                ),
                io.Latent.Input(
                    "latent", tooltip="The photo, encoded with a stock VAEEncode. A batch inverts as a batch."
                ),
                steps_input(),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=1.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Guidance while inverting; 1 (the original) uses only the positive prompt, one model "
                    "call per step. Above 1 it needs a negative.",
                ),
                io.Conditioning.Input("negative", optional=True, tooltip="Only for cfg above 1."),
            ],
            outputs=[
                io.Latent.Output(
                    tooltip="The inverted noise (50 steps: at t=981). Feed it to the BLIP-Diffusion Sampler, or to "
                    "SamplerCustom with add_noise off."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, cfg: float | None = None):
        return number_error(cls, cfg=cfg) or True

    @classmethod
    def execute(cls, model, positive, latent, steps: int, cfg: float, negative=None) -> io.NodeOutput:
        samples = latent["samples"]
        if samples.ndim != 4 or 0 in samples.shape:
            raise ValueError(f"latent: expected a batch of image latents [B,4,H,W], got shape {tuple(samples.shape)}")
        if INVERTED in latent:
            raise ValueError(
                "latent: this latent already is a DDIM inversion's result; invert the photo's latent "
                "(VAEEncode) instead"
            )
        if negative is None and cfg > 1.0:
            raise ValueError(f"negative: cfg {cfg} needs a negative prompt; connect one or use cfg 1 (the original)")
        samples = compat.fix_empty_latent_channels(model, samples)
        check_batches(positive, negative or [], samples.shape[0])
        sigmas = inversion_sigmas(steps)
        inverted = compat.sample(
            model,
            torch.zeros_like(samples),
            cfg,
            ReferenceInversion(),
            sigmas,
            positive,
            negative or [],
            samples,
            None,
            0,
        )
        out = {k: v for k, v in latent.items() if k != "noise_mask"}
        out["samples"] = inverted
        out[INVERTED] = {"steps": steps, "sigma": float(sigmas[-1])}
        return io.NodeOutput(out)


NODES = [BlipDiffusionDDIMInversion]
