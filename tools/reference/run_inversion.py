"""DDIM inversion and DDIM generation with diffusers' own schedulers, as the original LAVIS editing runs them.

Runs in the reference venv only (diffusers 0.39.0 + transformers 4.53.3):

    .refvenv/bin/python tools/reference/run_inversion.py REQUEST.json OUT.npz

REQUEST.json: {"model": dir, "image": png, "prompt": "...", "negative": "...", "steps": 4, "guidance": 7.5}

The photo is encoded with the VAE posterior's mode (as ComfyUI's VAEEncode), scaled by 0.18215, inverted
with DDIMInverseScheduler at guidance 1 on the plain prompt (SD-1.5's DDIM config: steps_offset 1,
set_alpha_to_one False, clip_sample False), then denoised again from the inverted latent with
DDIMScheduler (eta 0) at `guidance` with `negative`, as LAVIS's `edit` does for its source row.

OUT.npz: z0 (the scaled photo latent), inverted_<i> (the VP sample after inversion step i), timesteps,
latents_final (unscaled, as a ComfyUI LATENT) and image (HxWx3 in 0..1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip_diffusion_nodes.tools.reference.run_pipeline import DDIM_CONFIG, load_pipelines


def embed(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(input_ids=ids)[0]


@torch.no_grad()
def main(request_file: Path, out: Path) -> None:
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    req = json.loads(request_file.read_text())
    pipe, _ = load_pipelines(Path(req["model"]))
    scale = pipe.vae.config.scaling_factor
    pixels = torch.from_numpy(np.asarray(Image.open(req["image"]).convert("RGB"), dtype=np.float32) / 255)
    z = pipe.vae.encode(pixels.permute(2, 0, 1)[None] * 2 - 1).latent_dist.mode() * scale
    arrays = {"z0": z.numpy()}
    cond, uncond = embed(pipe, req["prompt"]), embed(pipe, req["negative"])

    inverse = DDIMInverseScheduler(**DDIM_CONFIG)
    inverse.set_timesteps(req["steps"])
    for i, t in enumerate(inverse.timesteps):
        z = inverse.step(pipe.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
        arrays[f"inverted_{i}"] = z.numpy()

    ddim = DDIMScheduler(**DDIM_CONFIG)
    ddim.set_timesteps(req["steps"])
    guidance = req["guidance"]
    for t in ddim.timesteps:
        if guidance > 1:
            eps_uncond, eps_cond = pipe.unet(
                torch.cat([z] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])
            ).sample.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        else:
            eps = pipe.unet(z, t, encoder_hidden_states=cond).sample
        z = ddim.step(eps, t, z).prev_sample
    arrays["timesteps"] = inverse.timesteps.numpy()
    arrays["latents_final"] = (z / scale).numpy()
    arrays["image"] = (pipe.vae.decode(z / scale).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
