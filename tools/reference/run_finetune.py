"""Subject fine-tuning as the original LAVIS recipe runs it, built from diffusers' own parts (parity reference).

Runs in the reference venv only (diffusers 0.39.0 + transformers 4.53.3):

    .refvenv/bin/python tools/reference/run_finetune.py REQUEST.json OUT.npz

`LavisLoop` is also what `make bench` times the pack's fine-tuning against (bench/reference_worker.py).

REQUEST.json: {"model": dir, "images": [image files, in the order the pack sees them], "category": "cat",
               "subject": .npy [views, 16, 768] (the zero-shot subject; training starts from the mean of its views),
               "steps": 3, "learning_rate": 5e-6, "batch_size": 3, "weight_decay": 0.01, "seed": 0,
               "resolution": 64, "ours": the pack's trace folder, "probe": {"z", "t", "context": .npy} or null}

The loop, step by step as LAVIS's BlipDiffusion.forward and its runner: the photos resized bicubically with
their short side to `resolution` and center-cropped (torchvision's Resize + CenterCrop on PIL images), scaled
to [-1, 1]; every step `batch_size` photos drawn at random, encoded by AutoencoderKL, a latent sampled from the
posterior x 0.18215, noise, t uniform in 0..999, DDPMScheduler.add_noise, the caption "a {category}" not
padded through ContextCLIPTextModel with the subject at position 2, UNet2DConditionModel, MSE on the noise,
torch.optim.AdamW (betas 0.9 / 0.999, eps 1e-8) with LAVIS's parameter groups. The random draws come from
one generator in the order blip_core/finetune.py documents, written out here again on their own.

OUT.npz: loss [steps], draws<k>_photos, draws<k>_timesteps, draws<k>_noise (step k, from 1) and, with a probe,
eps: the trained UNet's noise prediction on the probe's z, t and context.
Every gradient and trained tensor is compared here with the pack's (its trace folder: step<k>.safetensors holds
grad.<name>, final.safetensors <name>, by LAVIS's names: unet.<diffusers name>, ctx_embeddings_cache), so that
no second copy of a UNet's gradients is written per step: names [n] and, per tensor in that order,
grad<k> and final [n, 5]: ||ours - reference||, ||reference||, ||ours||, max |ours - reference|, max |reference|
(float64). A tensor one side has and the other lacks is an error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

SCALE = 0.18215


def crop(image: Image.Image, size: int) -> torch.Tensor:
    """torchvision's Resize(size, bicubic) + CenterCrop(size) + ToTensor + Normalize(0.5, 0.5) on a PIL image."""
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        image = image.resize((size, int(size * h / w)), Image.BICUBIC)
    else:
        image = image.resize((int(size * w / h), size), Image.BICUBIC)
    left, top = int(round((image.size[0] - size) / 2.0)), int(round((image.size[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return (pixels - 0.5) / 0.5


def no_decay(name: str, param: torch.Tensor) -> bool:
    """LAVIS BaseModel.get_optimizer_params."""
    return param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name


class LavisLoop:
    """LAVIS's fine-tuning loop on diffusers' parts (module docstring). `train_unet` False trains the subject
    alone (the pack's `subject` mode); the UNet is trained in place."""

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        pixels: torch.Tensor,
        subject: torch.Tensor,
        category: str,
        learning_rate: float,
        batch_size: int,
        weight_decay: float,
        seed: int,
        train_unet: bool = True,
    ):
        self.unet, self.vae, self.text_encoder, self.scheduler = unet, vae, text_encoder, scheduler
        self.pixels, self.batch = pixels, batch_size
        vae.requires_grad_(False)
        text_encoder.requires_grad_(False)
        unet.requires_grad_(train_unet)
        self.ctx = torch.nn.Parameter(subject.float().mean(dim=0, keepdim=True))
        self.named = [("ctx_embeddings_cache", self.ctx)]
        if train_unet:
            self.named += [(f"unet.{n}", p) for n, p in unet.named_parameters()]
        groups = [
            {"params": [p for n, p in self.named if not no_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in self.named if no_decay(n, p)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8)
        self.ids = tokenizer(
            [f"a {category}"] * batch_size, padding="do_not_pad", truncation=True, max_length=77, return_tensors="pt"
        ).input_ids
        self.generator = torch.Generator("cpu").manual_seed(seed)
        unet.train()

    def step(self, inspect: Callable[[dict[str, torch.Tensor]], None] | None = None) -> float:
        """One optimizer step; `inspect(draws)` sees the gradients before the update."""
        g, batch = self.generator, self.batch
        photos = torch.randint(len(self.pixels), (batch,), generator=g)
        with torch.no_grad():
            latents = self.vae.encode(self.pixels[photos]).latent_dist.sample(generator=g) * SCALE
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), generator=g)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        hidden = self.text_encoder(
            input_ids=self.ids, ctx_embeddings=self.ctx.expand(batch, -1, -1), ctx_begin_pos=[2] * batch
        )[0]
        predicted = self.unet(noisy.float(), timesteps, hidden).sample
        loss = F.mse_loss(predicted.float(), noise.float(), reduction="mean")
        loss.backward()
        if inspect is not None:
            inspect({"photos": photos, "timesteps": timesteps, "noise": noise})
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


def statistics(named: list[tuple[str, torch.Tensor]], ours_file: Path, prefix: str) -> np.ndarray:
    """[n, 5] per tensor of `named` against the pack's tensor `prefix` + name in `ours_file` (module docstring)."""
    rows = []
    with safe_open(str(ours_file), "pt") as ours:
        mine = {k[len(prefix) :] for k in ours.keys() if k.startswith(prefix)}
        theirs = {n for n, _ in named}
        if mine != theirs:
            raise ValueError(f"{ours_file.name}: tensors differ: {sorted(mine ^ theirs)[:5]}")
        for name, reference in named:
            reference = reference.detach().double()
            diff = ours.get_tensor(prefix + name).double() - reference
            stats = (diff.norm(), reference.norm(), (diff + reference).norm(), diff.abs().max(), reference.abs().max())
            rows.append([float(x) for x in stats])
    return np.array(rows, dtype=np.float64)


def main(request_file: Path, out: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTokenizer

    req = json.loads(request_file.read_text())
    model = Path(req["model"])
    loop = LavisLoop(
        unet=UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=torch.float32),
        vae=AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32),
        text_encoder=ContextCLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(model / "tokenizer"),
        scheduler=DDPMScheduler.from_config(DDPMScheduler.load_config(model / "scheduler")),
        pixels=torch.stack([crop(Image.open(p), req["resolution"]) for p in req["images"]]),
        subject=torch.from_numpy(np.load(req["subject"])),
        category=req["category"],
        learning_rate=req["learning_rate"],
        batch_size=req["batch_size"],
        weight_decay=req["weight_decay"],
        seed=req["seed"],
    )
    ours = Path(req["ours"])
    arrays, losses = {"names": np.array([n for n, _ in loop.named])}, []
    for k in range(1, req["steps"] + 1):

        def inspect(draws: dict[str, torch.Tensor], k: int = k) -> None:
            for name, value in draws.items():
                arrays[f"draws{k}_{name}"] = value.numpy()
            grads = [(n, p.grad) for n, p in loop.named]
            arrays[f"grad{k}"] = statistics(grads, ours / f"step{k}.safetensors", "grad.")

        losses.append(loop.step(inspect))
    arrays["final"] = statistics(loop.named, ours / "final.safetensors", "")
    arrays["loss"] = np.array(losses)
    probe = req.get("probe")
    if probe:
        with torch.no_grad():
            z, t, context = (torch.from_numpy(np.load(probe[k])) for k in ("z", "t", "context"))
            arrays["eps"] = loop.unet(z, t.long(), context.expand(len(t), -1, -1)).sample.numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
