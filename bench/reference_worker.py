"""The diffusers reference, timed on request: runs in the reference venv (see bench/run.py).

Reads one JSON command per line on stdin, answers one JSON line on stdout:
    {"op": "load", "model": DIR, "device": "cpu", "dtype": "fp32", "controlnet": true} -> {"seconds"}
    {"op": "encode", "batch": 4}                                    -> {"seconds", "cpu"}
    {"op": "conditioning", "prompt": "..."}                         -> {"seconds", "cpu"}
    {"op": "generate", "size": 256, "steps": 10, "controlnet": false, "seed": 0} -> {"seconds", "cpu"}
    {"op": "finetune", "size": 256, "steps": 3, "batch": 3, "mode": "unet+subject"} -> {"seconds", "cpu"}
    {"op": "peak_rss"}                                              -> {"bytes"}
    {"op": "peak_vram"}                                             -> {"bytes"} (0 on the CPU)
Each timed call is what BlipDiffusionPipeline does for that stage, on the same inputs as the pack.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip_diffusion_nodes.tools.reference.run_finetune import LavisLoop, crop
from blip_diffusion_nodes.tools.reference.run_pipeline import DDIM_CONFIG, load_pipelines

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NEGATIVE = "lowres, blurry, worst quality"


def bench_images(batch: int, size: int = 512) -> list[np.ndarray]:
    """The photos both sides encode (bench/run.py uses this function too)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]


def control_image(size: int) -> np.ndarray:
    """A blocky edge-like control image, the same on both sides."""
    rng = np.random.default_rng(1)
    return (
        np.repeat(np.repeat(rng.integers(0, 2, (size // 16, size // 16, 1)) * 255, 16, 0), 16, 1)
        .repeat(3, 2)
        .astype(np.uint8)
    )


def peak_rss() -> int:
    """VmHWM of this process: its peak resident memory, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Reference:
    def load(self, model: str, device: str = "cpu", dtype: str = "fp32", controlnet: bool = True) -> dict:
        start = time.perf_counter()
        self.device = torch.device(device)
        self.plain, self.controlled = load_pipelines(Path(model), DTYPES[dtype], device, controlnet)
        return {"seconds": time.perf_counter() - start}

    def _timed(self, fn) -> dict:
        """Wall time, and this process's CPU time (all threads): less sensitive to other load."""
        sync(self.device)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            fn()
        sync(self.device)
        return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}

    def encode(self, batch: int) -> dict:
        """Preprocessing + Q-Former + projection, as the pipeline encodes its reference image."""
        pipe, images = self.plain, [Image.fromarray(a) for a in bench_images(batch)]

        def run():
            pixels = pipe.image_processor.preprocess(
                images, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt"
            )["pixel_values"].to(self.device, pipe.qformer.dtype)
            pipe.get_query_embeddings(pixels, ["dog"] * batch)

        return self._timed(run)

    def conditioning(self, prompt: str) -> dict:
        """The prompt with the subject spliced in: the pipeline's encode_prompt (one text-encoder call)."""
        pipe = self.plain
        if not hasattr(self, "query"):
            pixels = pipe.image_processor.preprocess(
                [Image.fromarray(bench_images(1)[0])],
                return_tensors="pt",
                image_mean=pipe.config.mean,
                image_std=pipe.config.std,
            )
            with torch.no_grad():
                self.query = pipe.get_query_embeddings(
                    pixels["pixel_values"].to(self.device, pipe.qformer.dtype), ["dog"]
                )
        text = pipe._build_prompt([prompt], ["dog"])
        return self._timed(lambda: pipe.encode_prompt(self.query, text, self.device))

    def generate(self, size: int, steps: int, controlnet: bool = False, seed: int = 0) -> dict:
        """One whole image: subject encoding, both prompts, the sampling loop and the VAE decode."""
        args = ["swimming underwater", Image.fromarray(bench_images(1)[0])]
        pipe = self.plain
        if controlnet:
            pipe = self.controlled
            args.append(Image.fromarray(control_image(size)))
        generator = torch.Generator("cpu").manual_seed(seed)
        return self._timed(
            lambda: pipe(
                *args,
                "dog",
                "dog",
                guidance_scale=7.5,
                height=size,
                width=size,
                num_inference_steps=steps,
                neg_prompt=NEGATIVE,
                generator=generator,
            )
        )

    def invert(self, size: int, steps: int) -> dict:
        """DDIM inversion at guidance 1, as LAVIS's _ddim_inverse: the prompt's encoding and the loop with
        DDIMInverseScheduler (the photo's VAE latent is made once, outside the timing, as it is cached on the pack's
        side)."""
        from diffusers import DDIMInverseScheduler

        pipe = self.plain
        if getattr(self, "photo_size", None) != size:
            photo = Image.fromarray(bench_images(1)[0]).resize((size, size), Image.BICUBIC)
            pixels = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
            with torch.no_grad():
                latent = pipe.vae.encode(pixels.to(self.device, pipe.vae.dtype)).latent_dist.mode()
            self.photo_latent, self.photo_size = latent * pipe.vae.config.scaling_factor, size

        def run():
            ids = pipe.tokenizer(
                "a dog on the grass", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            cond = pipe.text_encoder(input_ids=ids)[0]
            scheduler = DDIMInverseScheduler(**DDIM_CONFIG)
            scheduler.set_timesteps(steps)
            z = self.photo_latent
            for t in scheduler.timesteps:
                z = scheduler.step(pipe.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample

        return self._timed(run)

    def finetune(self, size: int, steps: int, batch: int, mode: str) -> dict:
        """A whole fine-tuning run of LAVIS's loop on diffusers' parts (tools/reference/run_finetune.py), as the
        pack's node runs one: the photos cropped, the subject's start from its zero-shot embedding, then `steps`
        steps; `mode` unet+subject (the original) or subject. bench/run.py reads this process's peak memory. The
        UNet is trained in place: later calls start from its changed (random) weights."""
        from diffusers import DDPMScheduler

        if mode not in ("unet+subject", "subject"):
            raise ValueError(f"the reference loop has no {mode!r} mode")
        pipe, photos = self.plain, [Image.fromarray(a) for a in bench_images(3)]
        if not hasattr(self, "photo_subject"):  # the pack's zero-shot subject is cached after the warm-up too
            pixels = pipe.image_processor.preprocess(
                photos, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt"
            )["pixel_values"].to(self.device, pipe.qformer.dtype)
            with torch.no_grad():
                self.photo_subject = pipe.get_query_embeddings(pixels, ["dog"] * len(photos))

        def run():
            with torch.enable_grad():
                loop = LavisLoop(
                    pipe.unet,
                    pipe.vae,
                    pipe.text_encoder,
                    pipe.tokenizer,
                    DDPMScheduler.from_config(pipe.scheduler.config),  # the release's betas, as LAVIS
                    torch.stack([crop(p, size) for p in photos]).to(self.device),
                    self.photo_subject,
                    "dog",
                    learning_rate=5e-6,
                    batch_size=batch,
                    weight_decay=0.01,
                    seed=0,
                    train_unet=mode == "unet+subject",
                )
                for _ in range(steps):
                    loop.step()
            pipe.unet.requires_grad_(False).eval()

        return self._timed(run)

    def peak_rss(self) -> dict:
        return {"bytes": peak_rss()}

    def peak_vram(self) -> dict:
        """What PyTorch's caching allocator reserved at most: the GPU memory this process held."""
        return {"bytes": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0}


def main() -> None:
    ref = Reference()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        print(json.dumps(getattr(ref, op)(**cmd)), flush=True)


if __name__ == "__main__":
    main()
