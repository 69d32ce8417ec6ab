"""Run the real diffusers BlipDiffusion(ControlNet)Pipeline once and save its output and stage tensors.

Runs in the reference venv only (diffusers 0.39.0 + transformers 4.53.3):

    .refvenv/bin/python tools/reference/run_pipeline.py REQUEST.json OUT.npz

REQUEST.json: {"model": dir, "image": png, "subject": "dog", "target": "dog", "prompt": "...",
               "negative": "...", "seed": 0, "steps": 3, "guidance": 7.5, "height": 128, "width": 128,
               "strength": 1.0, "reps": 20, "control_image": png or null,
               "control_scales": [one factor per ControlNet call] or null,
               "device": "cpu" (default) or "cuda", "dtype": "fp32" (default) or "fp16"}

control_scales multiplies the ControlNet's residuals call by call (the pipeline fixes them at 1.0):
what a ComfyUI strength and start/end window mean, expressed on the reference.

OUT.npz (float32 arrays, whatever the device): image (float HxWx3 in 0..1), latents_final
(unscaled, as a ComfyUI LATENT), noise, cond, uncond, timesteps, eps0 (the UNet's first output,
both CFG halves) and, with a control image, the ControlNet's first down/mid residuals.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BERT_VOCAB = ROOT / "blip_core" / "assets" / "bert-base-uncased-vocab.txt"

# SD-1.5's DDIM scheduler settings, which LAVIS's editing and inversion use.
DDIM_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def load_pipelines(model: Path, dtype: torch.dtype = torch.float32, device: str = "cpu", controlnet: bool = True):
    """(BlipDiffusionPipeline, BlipDiffusionControlNetPipeline or None: none without `controlnet`), sharing their
    components.

    from_pretrained of the pipelines fails for the released layout in diffusers >= 0.38, so
    each component is loaded from its subfolder and the pipelines are constructed directly.
    """
    from diffusers import (
        AutoencoderKL,
        BlipDiffusionControlNetPipeline,
        BlipDiffusionPipeline,
        ControlNetModel,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import Blip2Config, CLIPTokenizer

    kw = {"torch_dtype": dtype}
    with tempfile.TemporaryDirectory() as vocab_dir:
        shutil.copy(BERT_VOCAB, Path(vocab_dir) / "vocab.txt")
        config = Blip2Config.from_pretrained(model / "qformer")
        config.tokenizer = vocab_dir  # the released config has none and would fetch bert-base-uncased
        qformer = Blip2QFormerModel.from_pretrained(model / "qformer", config=config, **kw)
    parts = dict(
        tokenizer=CLIPTokenizer.from_pretrained(model / "tokenizer"),
        text_encoder=ContextCLIPTextModel.from_pretrained(model / "text_encoder", **kw),
        vae=AutoencoderKL.from_pretrained(model / "vae", **kw),
        unet=UNet2DConditionModel.from_pretrained(model / "unet", **kw),
        scheduler=PNDMScheduler.from_pretrained(model / "scheduler"),
        qformer=qformer,
        image_processor=BlipImageProcessor.from_pretrained(model / "image_processor"),
    )
    index = json.loads((model / "model_index.json").read_text())
    extra = {"ctx_begin_pos": index["ctx_begin_pos"], "mean": index["mean"], "std": index["std"]}
    plain = BlipDiffusionPipeline(**parts, **extra).to(device)
    controlled = None
    if controlnet and (model / "controlnet" / "config.json").is_file():
        net = ControlNetModel.from_pretrained(model / "controlnet", **kw)
        controlled = BlipDiffusionControlNetPipeline(controlnet=net, **parts, **extra).to(device)
    for pipe in (plain, controlled):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    return plain, controlled


def record_first(module, store: dict, key: str, pick=lambda out: out):
    """Keep the first output of `module` under `key`."""

    def hook(_, __, out):
        store.setdefault(key, pick(out))

    return module.register_forward_hook(hook)


def scale_calls(controlnet, scales: list[float]):
    """Multiply the residuals of the i-th ControlNet call by scales[i]."""
    calls = iter(scales)

    def hook(_, __, out):
        scale = next(calls)
        down, mid = out
        return [d * scale for d in down], mid * scale

    return controlnet.register_forward_hook(hook)


def record_all(module, store: list):
    return module.register_forward_hook(lambda _, __, out: store.append(out[0].detach().clone()))


@torch.no_grad()
def main(request_file: Path, out: Path) -> None:
    req = json.loads(request_file.read_text())
    model = Path(req["model"])
    control = req.get("control_image")
    device = req.get("device", "cpu")  # tools/gpu_check.py: "cuda" and "fp16"
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[req.get("dtype", "fp32")]
    plain, controlled = load_pipelines(model, dtype, device)
    pipe = plain if control is None else controlled
    store: dict[str, torch.Tensor] = {}
    texts: list[torch.Tensor] = []
    hooks = [
        record_all(pipe.text_encoder, texts),
        record_first(pipe.unet, store, "eps0", lambda out: out[0].detach().clone()),
    ]
    if req.get("control_scales") is not None:  # registered first: the recording hook sees scaled residuals
        hooks.append(scale_calls(pipe.controlnet, req["control_scales"]))
    if control is not None:
        hooks.append(record_first(pipe.controlnet, store, "control0", lambda out: out))
    decode = pipe.vae.decode

    def recording_decode(z, *a, **k):  # the pipeline decodes latents / scaling_factor: ComfyUI's LATENT
        store["latents_final"] = z.detach().clone()
        return decode(z, *a, **k)

    pipe.vae.decode = recording_decode
    height, width = req["height"], req["width"]
    factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    generator = torch.Generator("cpu").manual_seed(req["seed"])
    noise = torch.randn((1, pipe.unet.config.in_channels, height // factor, width // factor), generator=generator)
    args = [req["prompt"], Image.open(req["image"]).convert("RGB")]
    if control is not None:
        args.append(Image.open(control).convert("RGB"))
    result = pipe(
        *args,
        req["subject"],
        req["target"],
        latents=noise.to(device, dtype),
        guidance_scale=req["guidance"],
        height=height,
        width=width,
        num_inference_steps=req["steps"],
        neg_prompt=req["negative"],
        prompt_strength=req["strength"],
        prompt_reps=req["reps"],
        output_type="pt",
    )
    for h in hooks:
        h.remove()
    as_numpy = lambda x: x.float().cpu().numpy()
    arrays = {
        "image": as_numpy(result.images[0].permute(1, 2, 0)),
        "noise": noise.numpy(),
        "cond": as_numpy(texts[0]),
        "uncond": as_numpy(texts[1]),
        "eps0": as_numpy(store["eps0"]),
        "timesteps": pipe.scheduler.timesteps.cpu().numpy(),
        "latents_final": as_numpy(store["latents_final"]),
    }
    if control is not None:
        down, mid = store["control0"]
        arrays.update({f"control0_down{i}": as_numpy(d) for i, d in enumerate(down)})
        arrays["control0_mid"] = as_numpy(mid)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
