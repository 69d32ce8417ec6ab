"""Run the real diffusers BLIP-Diffusion reference on a micro model and save its stage tensors.

Runs in the reference venv (diffusers 0.39.0 + transformers 4.53.3), never in the product:

    .refvenv/bin/python tools/reference/make_parity_fixtures.py MODEL_DIR OUT.npz

MODEL_DIR is written by `tools/make_tiny_model.py --size micro` (see `make fixtures`). The
file records the SHA-256 of every weight file, so tests can tell when it is stale.
The reference pipeline cannot be loaded with from_pretrained in diffusers >= 0.38, so
each component is loaded from its subfolder and the pipeline is constructed directly.
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

from blip_diffusion_nodes.tools.make_tiny_model import weights_digest
from blip_diffusion_nodes.tools.reference.run_pipeline import DDIM_CONFIG

ROOT = Path(__file__).resolve().parents[2]
BERT_VOCAB = ROOT / "blip_core" / "assets" / "bert-base-uncased-vocab.txt"

# (name, PIL mode, width, height, subject categories, prompt, target, strength)
CASES = [
    ("square", "RGB", 64, 64, ["dog"], "swimming underwater", "dog", 1.0),
    ("wide", "RGB", 300, 200, ["teapot"], "on a marble table", "teapot", 0.5),
    ("rgba", "RGBA", 80, 120, ["flower"], "in a vase", "bag", 1.0),
    ("gray", "L", 50, 70, ["cat"], "sleeping", "cat", 0.0),
    ("pair", "RGB", 96, 64, ["dog", "teddy bear"], "on the beach", "tiger", 1.0),
]
NEGATIVE = "over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped"
SCHEDULE_STEPS = [1, 2, 3, 25, 50]


def images_for(name: str, mode: str, w: int, h: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, name)))
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    return [rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8) for _ in range(count)]


def to_pil(arr: np.ndarray, mode: str) -> Image.Image:
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)


def load_reference(model_dir: Path, vocab_dir: Path):
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import Blip2Config, CLIPTokenizer

    config = Blip2Config.from_pretrained(model_dir / "qformer")
    config.tokenizer = str(vocab_dir)  # the released config has none and would fetch bert-base-uncased
    qformer = Blip2QFormerModel.from_pretrained(model_dir / "qformer", config=config, torch_dtype=torch.float32).eval()
    text_encoder = ContextCLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    processor = BlipImageProcessor.from_pretrained(model_dir / "image_processor")
    return qformer, text_encoder, tokenizer, processor


def reference_pipeline(qformer, text_encoder, tokenizer, processor, model_dir: Path):
    from diffusers import BlipDiffusionPipeline

    index = json.loads((model_dir / "model_index.json").read_text())
    return BlipDiffusionPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=None,
        unet=None,
        scheduler=None,
        qformer=qformer,
        image_processor=processor,
        ctx_begin_pos=index["ctx_begin_pos"],
        mean=index["mean"],
        std=index["std"],
    )


def plms_trace(steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """diffusers' PNDMScheduler on a fixed synthetic noise predictor (VP form), for the sampler test."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True
    )
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 4, 8, 8, generator=g)
    weight = torch.randn(4, 4, generator=g) / 2
    z0 = z.clone()
    for t in scheduler.timesteps:
        eps = synthetic_eps(z, int(t), weight)
        z = scheduler.step(eps, t, z).prev_sample
    return {"z_init": z0.numpy(), "z_final": z.numpy(), "weight": weight.numpy()}


def ddim_traces(steps: int, seed: int = 1) -> dict[str, np.ndarray]:
    """diffusers' DDIMScheduler (eta 0) and DDIMInverseScheduler with SD-1.5's DDIM config (as LAVIS's editing)
    on the synthetic noise predictor, every step's sample kept."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    g = torch.Generator().manual_seed(seed)
    z_init = torch.randn(1, 4, 8, 8, generator=g)
    weight = torch.randn(4, 4, generator=g) / 2
    out = {"z_init": z_init.numpy(), "weight": weight.numpy()}
    for name, cls in (("ddim", DDIMScheduler), ("inverse", DDIMInverseScheduler)):
        scheduler = cls(**DDIM_CONFIG)
        scheduler.set_timesteps(steps)
        z = z_init.clone()
        for i, t in enumerate(scheduler.timesteps):
            z = scheduler.step(synthetic_eps(z, int(t), weight), t, z).prev_sample
            out[f"{name}_{i}"] = z.numpy()
        out[f"{name}_timesteps"] = scheduler.timesteps.numpy()
    return out


def synthetic_eps(z: torch.Tensor, t: int, weight: torch.Tensor) -> torch.Tensor:
    """A smooth, timestep-dependent stand-in for the UNet (the same formula lives in the test)."""
    return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, z) * (1 + t / 1000))


@torch.no_grad()
def main(model_dir: Path, out: Path) -> None:
    with tempfile.TemporaryDirectory() as vocab_dir:
        shutil.copy(BERT_VOCAB, Path(vocab_dir) / "vocab.txt")
        parts = load_reference(model_dir, Path(vocab_dir))
        pipe = reference_pipeline(*parts, model_dir)
    qformer, text_encoder, tokenizer, processor = parts
    arrays: dict[str, np.ndarray] = {}
    meta = {"digest": weights_digest(model_dir), "negative": NEGATIVE, "cases": []}
    for name, mode, w, h, subjects, prompt, target, strength in CASES:
        raw = images_for(name, mode, w, h, len(subjects))
        pil = [to_pil(a, mode) for a in raw]
        pixels = processor.preprocess(pil, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt")[
            "pixel_values"
        ]
        bert = qformer.tokenizer(subjects, return_tensors="pt", padding=True)
        query = pipe.get_query_embeddings(pixels, subjects)
        prompts = pipe._build_prompt([prompt] * len(subjects), [target] * len(subjects), prompt_strength=strength)
        max_len = text_encoder.text_model.config.max_position_embeddings - qformer.config.num_query_tokens
        clip_ids = tokenizer(
            prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        ).input_ids
        cond = pipe.encode_prompt(query, prompts, device="cpu")
        uncond_ids = tokenizer(
            [NEGATIVE] * len(subjects),
            padding="max_length",
            max_length=text_encoder.text_model.config.max_position_embeddings,
            return_tensors="pt",
        ).input_ids
        uncond = text_encoder(input_ids=uncond_ids, ctx_embeddings=None)[0]
        for i, a in enumerate(raw):
            arrays[f"{name}/image{i}"] = a
        arrays.update(
            {
                f"{name}/pixel_values": pixels.numpy(),
                f"{name}/bert_ids": bert.input_ids.numpy(),
                f"{name}/query_embeds": query.numpy(),
                f"{name}/clip_ids": clip_ids.numpy(),
                f"{name}/cond": cond.numpy(),
                f"{name}/uncond_ids": uncond_ids.numpy(),
                f"{name}/uncond": uncond.numpy(),
            }
        )
        meta["cases"].append(
            {
                "name": name,
                "mode": mode,
                "subjects": subjects,
                "prompt": prompt,
                "target": target,
                "strength": strength,
                "built_prompts": prompts,
            }
        )
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, skip_prk_steps=True
    )
    arrays["schedule/alphas_cumprod"] = scheduler.alphas_cumprod.numpy()
    for steps in SCHEDULE_STEPS:
        scheduler.set_timesteps(steps)
        arrays[f"schedule/timesteps_{steps}"] = scheduler.timesteps.numpy()
    for steps in (3, 25):
        for k, v in plms_trace(steps).items():
            arrays[f"plms_{steps}/{k}"] = v
        for k, v in ddim_traces(steps).items():
            arrays[f"ddim_{steps}/{k}"] = v
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
