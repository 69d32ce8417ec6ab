"""Sampling: the reference PLMS and DDIM samplers on ComfyUI's machinery (CFG, ControlNet, previews, cancel)."""

from __future__ import annotations

import torch

from ..blip_core.sampling import (
    DDIM_OFFSET,
    NUM_TRAIN_TIMESTEPS,
    PLMS_OFFSET,
    reference_sigmas,
    sample_ddim,
    sample_plms,
    starts_from_noise,
)
from . import compat, editing
from .api import CATEGORY, combo_error, io, number_error

# The reference samplers, by sampler_name: their loop and the steps_offset of their schedule.
REFERENCE = {"pndm": (sample_plms, PLMS_OFFSET), "reference_ddim": (sample_ddim, DDIM_OFFSET)}
SAMPLERS = [*REFERENCE, *compat.sampler_names()]
SCHEDULERS = ["reference", *compat.scheduler_names()]
SCHEDULES = {"pndm": "pndm", "ddim": "reference_ddim"}  # BlipDiffusionReferenceSigmas' choices
INVERTED = "blipd_inverted"  # a LATENT key: the latent is a DDIM inversion's end, a VE sample at this sigma
MAX_SCHEDULE = 10_000  # steps / denoise for ComfyUI's schedulers: more is a typo or hostile, not a schedule


def steps_input() -> io.Int.Input:
    return io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Denoising steps (the reference uses 50).")


def denoise_input(tooltip: str) -> io.Float.Input:
    return io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


def eps_function(model_wrap, sigmas, extra_args, latent_image, noise, sampler: str):
    """eps(x, sigma) of the model ComfyUI hands a SAMPLER (its guider: CFG, ControlNet, masks applied),
    after checking the model suits the reference samplers' maths."""
    compat.check_reference_schedule(model_wrap, sampler)
    compat.prefer_pytorch_attention(extra_args["model_options"], noise.device)  # this run's copy of the options
    model = compat.reference_model_call(model_wrap, sigmas, latent_image, noise)

    def eps(x, sigma):
        return (x - model(x, sigma * x.new_ones([x.shape[0]]), **extra_args)) / sigma

    return eps


def progress(callback, total: int):
    """The sampler loops' callback(i, x, denoised) as ComfyUI's previews and progress bar take it."""

    def on_step(i, x, denoised):
        if callback is not None:
            callback(i, denoised, x, total)

    return on_step


class ReferenceSampler(compat.Sampler):
    """The reference's PLMS (diffusers' PNDMScheduler) or DDIM with eta 0 as a ComfyUI SAMPLER.

    On a full schedule (blip_core.sampling.starts_from_noise) it draws the initial sample as
    the reference does, unit-variance noise in VP form (x = noise * sqrt(1 + sigma^2)); on a
    partial one (img2img) it noises the latent to the first sigma as ComfyUI does; with zero
    noise (an inverted latent, or SamplerCustom's add_noise off) it starts from the latent as it
    is. It returns the VP sample at the last sigma, which is what the reference decodes.
    """

    def __init__(self, name: str):
        self.name = name

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        extra_args["denoise_mask"] = denoise_mask
        eps = eps_function(
            model_wrap, sigmas, extra_args, latent_image, noise, f"the BLIP-Diffusion {self.name} sampler"
        )
        start = (1 + sigmas[0] ** 2).sqrt() if starts_from_noise(sigmas) else sigmas[0]
        x = noise * start + (latent_image if latent_image is not None else 0)
        loop, _ = REFERENCE[self.name]
        blend = editing.claim_step_hook(extra_args["model_options"])  # an edit's LocalBlend, between steps
        x = loop(eps, x, sigmas, progress(callback, len(sigmas) - 1), after_step=blend)
        return x / (1 + sigmas[-1] ** 2).sqrt()


def schedule_error(steps: int | None, denoise: float | None, scheduler: str | None) -> str | None:
    """Why `steps` at `denoise` make no schedule, or None. Like ComfyUI's KSampler, denoise d runs the last
    `steps` of a schedule of steps / d; the reference schedule has at most 1000 distinct timesteps (its spacing
    would be 0 beyond), and ComfyUI's schedulers are bounded too, so a tiny denoise cannot ask for billions."""
    if steps is None or denoise is None or not 0.0 < denoise < 0.9999:
        return None
    limit = NUM_TRAIN_TIMESTEPS if scheduler == "reference" else MAX_SCHEDULE
    if steps / denoise > limit:
        what = (
            "the reference schedule has at most 1000 timesteps"
            if limit == NUM_TRAIN_TIMESTEPS
            else (f"at most {MAX_SCHEDULE} are supported")
        )
        return (
            f"denoise: {steps} steps at denoise {denoise:g} need a schedule of {steps / denoise:.0f} steps, but "
            f"{what}: use a denoise of at least {steps / limit:.4g}, or fewer steps"
        )
    return None


def sampler_sigmas(model, sampler_name: str, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas a KSampler would use, plus the `reference` schedule (PNDM's timesteps, or DDIM's for
    reference_ddim)."""
    if denoise <= 0.0:
        return torch.zeros(0)
    error = schedule_error(steps, denoise, scheduler)
    if error:
        raise ValueError(error)
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    if scheduler == "reference":
        _, offset = REFERENCE.get(sampler_name, REFERENCE["pndm"])
        sigmas = reference_sigmas(total, offset)
        if sampler_name not in REFERENCE:  # ComfyUI's samplers end on sigma 0, the clean image
            sigmas = torch.cat([sigmas[:-1], sigmas.new_zeros(1)])
    else:
        sigmas = compat.scheduler_sigmas(model, sampler_name, scheduler, total)
    return sigmas[-(steps + 1) :]


def start_noise(latent_image: dict, latent: torch.Tensor, seed: int, sigmas: torch.Tensor, denoise: float):
    """The initial noise: the seed's, or none for an inverted latent, which already is the start (checked to be
    the start of this schedule)."""
    inverted = latent_image.get(INVERTED)
    if inverted is None:
        return compat.prepare_noise(latent, seed, latent_image.get("batch_index"))
    if denoise < 0.9999:
        raise ValueError(
            f"denoise: latent_image is a DDIM inversion's result, the start of the whole schedule; use denoise 1.0 "
            f"(got {denoise}), or invert fewer steps"
        )
    if abs(float(sigmas[0]) - inverted["sigma"]) > 1e-4 * inverted["sigma"]:
        raise ValueError(
            f"steps: latent_image was inverted with {inverted['steps']} steps, up to noise level "
            f"{inverted['sigma']:.3f}, but this schedule starts at {float(sigmas[0]):.3f}: sample with "
            f"{inverted['steps']} steps and the reference scheduler (reference_ddim, as the inversion)"
        )
    return torch.zeros_like(latent)


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
                    "latent_image",
                    tooltip="An empty latent for text-to-image, VAE-encoded for img2img, or the result of "
                    "BLIP-Diffusion DDIM Inversion (then no noise is added, whatever the seed).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed; equals the reference's torch.Generator('cpu').manual_seed(seed).",
                ),
                steps_input(),
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
                    tooltip="pndm: the reference PLMS sampler (the release). reference_ddim: DDIM with eta 0 as the "
                    "original's editing uses it (start it from a DDIM Inversion). The others are ComfyUI's.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=SCHEDULERS,
                    default="reference",
                    tooltip="reference: the reference schedule (pndm, 25 steps: 960, 920, 880, ...; reference_ddim, "
                    "50 steps: 981, 961, ...). The others are ComfyUI's.",
                ),
                denoise_input("Below 1: keep part of the input latent (img2img)."),
            ],
            outputs=[io.Latent.Output(tooltip="Denoised latent; decode it with VAEDecode.")],
        )

    @classmethod
    def validate_inputs(
        cls,
        sampler_name: str | None = None,
        scheduler: str | None = None,
        cfg: float | None = None,
        denoise: float | None = None,
        steps: int | None = None,
    ):
        return (
            combo_error("sampler_name", sampler_name, SAMPLERS)
            or combo_error("scheduler", scheduler, SCHEDULERS)
            or number_error(cls, steps=steps, cfg=cfg, denoise=denoise)
            or schedule_error(steps, denoise, scheduler)
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
        check_batches(positive, negative, editing.sampled_batch(model, positive, latent.shape[0]))
        sigmas = sampler_sigmas(model, sampler_name, scheduler, steps, denoise)
        noise = start_noise(latent_image, latent, seed, sigmas, denoise)
        sampler = ReferenceSampler(sampler_name) if sampler_name in REFERENCE else compat.sampler(sampler_name)
        samples = compat.sample(
            model, noise, cfg, sampler, sigmas, positive, negative, latent, latent_image.get("noise_mask"), seed
        )
        out = {k: v for k, v in latent_image.items() if k != INVERTED}
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
        return io.NodeOutput(ReferenceSampler("pndm"))


class BlipDiffusionDDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionDDIMSampler",
            display_name="BLIP-Diffusion DDIM Sampler",
            category=f"{CATEGORY}/sampling",
            description="The reference DDIM sampler (eta 0, as the original's editing) for SamplerCustom / "
            "SamplerCustomAdvanced. Pair it with BLIP-Diffusion Reference Sigmas (schedule ddim); from a DDIM "
            "Inversion, turn add_noise off.",
            inputs=[],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(ReferenceSampler("reference_ddim"))


class BlipDiffusionReferenceSigmas(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionReferenceSigmas",
            display_name="BLIP-Diffusion Reference Sigmas",
            category=f"{CATEGORY}/sampling",
            description="The reference schedules as SIGMAS: PNDM's (for the BLIP-Diffusion PLMS Sampler) or DDIM's "
            "(for the BLIP-Diffusion DDIM Sampler).",
            inputs=[
                steps_input(),
                denoise_input("Below 1: only the last part of the schedule (img2img)."),
                io.Combo.Input(
                    "schedule",
                    options=list(SCHEDULES),
                    default="pndm",
                    optional=True,  # optional: older prompts lack it
                    tooltip="pndm: the release's PLMS timesteps (25 steps: 960, 920, ...). ddim: SD-1.5's DDIM "
                    "timesteps (50 steps: 981, 961, ..., 1), which the DDIM Inversion walks up.",
                ),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def validate_inputs(cls, schedule: str | None = None, denoise: float | None = None, steps: int | None = None):
        return (
            combo_error("schedule", schedule, list(SCHEDULES))
            or number_error(cls, steps=steps, denoise=denoise)
            or schedule_error(steps, denoise, "reference")
            or True
        )

    @classmethod
    def execute(cls, steps: int, denoise: float, schedule: str = "pndm") -> io.NodeOutput:
        return io.NodeOutput(sampler_sigmas(None, SCHEDULES[schedule], "reference", steps, denoise))


NODES = [BlipDiffusionSampler, BlipDiffusionPLMSSampler, BlipDiffusionDDIMSampler, BlipDiffusionReferenceSigmas]
