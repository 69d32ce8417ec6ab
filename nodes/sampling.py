"""Sampling: the reference PLMS sampler on ComfyUI's machinery (CFG, ControlNet, previews, cancel)."""

from __future__ import annotations

import torch

from ..blip_core.sampling import reference_sigmas, sample_plms, starts_from_noise
from . import compat
from .api import CATEGORY, combo_error, io

SAMPLERS = ["pndm", *compat.sampler_names()]
SCHEDULERS = ["reference", *compat.scheduler_names()]


class ReferencePLMS(compat.Sampler):
    """diffusers' PNDMScheduler (PLMS mode) as a ComfyUI SAMPLER.

    On a full schedule (blip_core.sampling.starts_from_noise) it draws the initial sample as
    the reference does, unit-variance noise in VP form (x = noise * sqrt(1 + sigma^2)); on a
    partial one (img2img) it noises the latent to the first sigma as ComfyUI does. It returns
    the VP sample at the last sigma, which is what the reference decodes. On the CPU it
    prefers PyTorch's attention kernel to ComfyUI's fallback (compat.prefer_pytorch_attention).
    """

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        compat.check_reference_schedule(model_wrap, "the BLIP-Diffusion pndm sampler")
        extra_args["denoise_mask"] = denoise_mask
        compat.prefer_pytorch_attention(extra_args["model_options"], noise.device)  # this run's copy of the options
        model = compat.reference_model_call(model_wrap, sigmas, latent_image, noise)
        start = (1 + sigmas[0] ** 2).sqrt() if starts_from_noise(sigmas) else sigmas[0]
        x = noise * start + (latent_image if latent_image is not None else 0)
        ones = x.new_ones([x.shape[0]])

        def eps(x, sigma):
            return (x - model(x, sigma * ones, **extra_args)) / sigma

        def on_step(i, x, denoised):
            if callback is not None:
                callback(i, denoised, x, len(sigmas) - 1)

        x = sample_plms(eps, x, sigmas, on_step)
        return x / (1 + sigmas[-1] ** 2).sqrt()


def sampler_sigmas(model, sampler_name: str, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas a KSampler would use, plus the `reference` schedule (PNDM's timesteps)."""
    if denoise <= 0.0:
        return torch.zeros(0)
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    if scheduler == "reference":
        sigmas = reference_sigmas(total)
        if sampler_name != "pndm":  # ComfyUI's samplers end on sigma 0, the clean image
            sigmas = torch.cat([sigmas[:-1], sigmas.new_zeros(1)])
    else:
        sigmas = compat.scheduler_sigmas(model, sampler_name, scheduler, total)
    return sigmas[-(steps + 1) :]


def check_batches(positive, negative, batch: int) -> None:
    for name, conditioning in (("positive", positive), ("negative", negative)):
        for cond, _ in conditioning:
            if cond.shape[0] not in (1, batch):
                raise ValueError(
                    f"{name}: a conditioning of batch {cond.shape[0]} cannot be paired with "
                    f"{batch} latents (use 1, or one per latent). With the Multimodal Prompt's "
                    f"multi_image 'per latent' that means {cond.shape[0]} subject images for {batch} "
                    "latents: give as many images as latents (EmptyLatentImage batch_size), or "
                    "use 'average'"
                )


class BlipDiffusionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionSampler",
            display_name="BLIP-Diffusion Sampler",
            category=f"{CATEGORY}/sampling",
            description="A KSampler whose defaults reproduce the BLIP-Diffusion release: pndm (PLMS) on the reference "
            "schedule, same noise for the same seed. Every ComfyUI sampler and scheduler works too.",
            inputs=[
                io.Model.Input(
                    "model", tooltip="The BLIP-Diffusion UNet (or any SD-1.5 MODEL, LoRAs and patches included)."
                ),
                io.Conditioning.Input(
                    "positive", tooltip="From the BLIP-Diffusion Multimodal Prompt (or any CONDITIONING)."
                ),
                io.Conditioning.Input("negative", tooltip="Usually a CLIPTextEncode of the negative prompt."),
                io.Latent.Input(
                    "latent_image", tooltip="An empty latent for text-to-image, or VAE-encoded for img2img."
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed; equals the reference's torch.Generator('cpu').manual_seed(seed).",
                ),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Denoising steps (the reference uses 50)."),
                io.Float.Input(
                    "cfg",
                    default=7.5,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance scale.",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=SAMPLERS,
                    default="pndm",
                    tooltip="pndm: the reference PLMS sampler. The others are ComfyUI's.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=SCHEDULERS,
                    default="reference",
                    tooltip="reference: PNDM's timesteps (e.g. 25 steps: 960, 920, 880, ...). "
                    "The others are ComfyUI's.",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Below 1: keep part of the input latent (img2img).",
                ),
            ],
            outputs=[io.Latent.Output(tooltip="Denoised latent; decode it with VAEDecode.")],
        )

    @classmethod
    def validate_inputs(cls, sampler_name: str | None = None, scheduler: str | None = None):
        return (
            combo_error("sampler_name", sampler_name, SAMPLERS)
            or combo_error("scheduler", scheduler, SCHEDULERS)
            or True
        )

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        latent_image,
        seed: int,
        steps: int,
        cfg: float,
        sampler_name: str,
        scheduler: str,
        denoise: float,
    ) -> io.NodeOutput:
        latent = compat.fix_empty_latent_channels(model, latent_image["samples"])
        check_batches(positive, negative, latent.shape[0])
        noise = compat.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = sampler_sigmas(model, sampler_name, scheduler, steps, denoise)
        sampler = ReferencePLMS() if sampler_name == "pndm" else compat.sampler(sampler_name)
        samples = compat.sample(
            model, noise, cfg, sampler, sigmas, positive, negative, latent, latent_image.get("noise_mask"), seed
        )
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(out)


class BlipDiffusionPLMSSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionPLMSSampler",
            display_name="BLIP-Diffusion PLMS Sampler",
            category=f"{CATEGORY}/sampling",
            description="The reference PLMS (pndm) sampler for SamplerCustom / SamplerCustomAdvanced. Pair it with "
            "BLIP-Diffusion Reference Sigmas to reproduce the release.",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(ReferencePLMS())


class BlipDiffusionReferenceSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionReferenceSigmas",
            display_name="BLIP-Diffusion Reference Sigmas",
            category=f"{CATEGORY}/sampling",
            description="PNDM's reference schedule as SIGMAS (for the BLIP-Diffusion PLMS Sampler).",
            inputs=[
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Denoising steps (the reference uses 50)."),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Below 1: only the last part of the schedule (img2img).",
                ),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, steps: int, denoise: float) -> io.NodeOutput:
        return io.NodeOutput(sampler_sigmas(None, "pndm", "reference", steps, denoise))


NODES = [BlipDiffusionSampler, BlipDiffusionPLMSSampler, BlipDiffusionReferenceSigmas]
