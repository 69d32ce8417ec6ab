"""Subject fine-tuning as the original BLIP-Diffusion does it, in pure PyTorch.

The original is LAVIS's `BlipDiffusion.forward` with its subject-driven dataset, its runner and
`projects/blip_diffusion/finetune-db-*.yaml`. Its recipe, which `SubjectFinetune` follows:
- photos: each one's short side resized bicubically to 512 and the centre 512x512 kept (`crop_photos`), then
  the frozen VAE's posterior (a mean and a std per latent pixel);
- the subject: the mean of the photos' zero-shot subject embeddings, a trainable [1, 16, 768] tensor;
- every step: `batch_size` photos drawn at random (with replacement: LAVIS shuffles the photos repeated
  100,000 times), a latent sampled from each posterior and scaled by 0.18215, t uniform in 0..999, DDPM
  noising z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, the caption "a {category}" not padded (BOS, "a", the
  16 subject vectors, the category, EOS) through the frozen CLIP, loss = MSE(UNet(z_t, t, text), eps);
- AdamW (betas 0.9 / 0.999, eps 1e-8) at a constant learning rate (5e-6), weight decay (0.01) on the tensors
  with ndim >= 2 whose names hold none of "bias", "ln", "bn", and none on the others (LAVIS's parameter
  groups); 40 steps of batch 3 for the paper's dog. fp32 here; on a GPU mixed precision with fp32 weights
  (LAVIS: fp16 autocast and a gradient scaler).

Modes: `unet+subject` trains every UNet tensor and the subject (the original); `lora+subject` a LoRA of each
UNet weight with ndim >= 2 (scale 1: alpha = rank) and the subject; `subject` the subject alone.

The random draws, the one documented way (tools/reference/run_finetune.py reproduces them from the seed):
    g = torch.Generator("cpu").manual_seed(seed)
    lora+subject, before the first step: for each LoRA'd weight in the order of its sorted diffusers name,
        down = (torch.rand(shape, generator=g) * 2 - 1) / sqrt(fan_in), up = 0
    every step, in LAVIS's own order: photos = torch.randint(N, (B,), generator=g),
        posterior noise = torch.randn(B, 4, h, w, generator=g), noise = torch.randn(B, 4, h, w, generator=g),
        timesteps = torch.randint(0, 1000, (B,), generator=g)

The host (the ComfyUI nodes) supplies its UNet and CLIP as modules plus a call each; they are never
modified: trained and frozen tensors stand in for their parameters only while they run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .preprocess import short_side_crop, to_rgb, to_uint8
from .sampling import NUM_TRAIN_TIMESTEPS, alphas_cumprod

MODES = ("unet+subject", "lora+subject", "subject")
RESOLUTION = 512
LATENT_SCALE = 0.18215
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
SUBJECT_NAME = "ctx_embeddings_cache"  # LAVIS's name of the trained subject (in its checkpoints too)
UNET_PREFIX = "unet."  # LAVIS's names of UNet tensors: "unet." + the diffusers name
NO_DECAY_MARKERS = ("bias", "ln", "bn")  # LAVIS BaseModel.get_optimizer_params
FUSED_ADAM_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Settings:
    """One run's settings; the defaults are the original's (finetune-db-dog.yaml)."""

    steps: int = 40
    learning_rate: float = 5e-6
    batch_size: int = 3
    weight_decay: float = 0.01
    mode: str = "unet+subject"
    rank: int = 8  # lora+subject only
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"train: {self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("steps", "batch_size", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected 1 or more, got {getattr(self, name)}")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number, 0 or more, got {value}")


def caption(category: str) -> str:
    """The training caption "a {category}" as LAVIS's caption processor leaves it: lower case, the
    punctuation . ! " ( ) * # : ; ~ turned into spaces, single spaces."""
    text = re.sub(r"([.!\"()*#:;~])", " ", f"a {category}".lower())
    return re.sub(r"\s{2,}", " ", text).strip()


def crop_photos(images: Iterable[torch.Tensor], size: int = RESOLUTION) -> torch.Tensor:
    """ComfyUI IMAGE batches ([B,H,W,C] in 0..1, of any sizes) -> the photos as LAVIS feeds its VAE,
    [N, size, size, 3] in 0..1: each photo's 8-bit pixels with the short side resized bicubically to `size`
    and the centre kept (torchvision's Resize + CenterCrop on PIL images)."""
    photos = [arr for batch in images if batch.shape[0] > 0 for arr in to_uint8(to_rgb(batch, "images"))]
    if not photos:
        raise ValueError("images: no photos; connect 3 to 5 photos of the subject (an IMAGE batch or list)")
    cropped = np.stack([np.asarray(short_side_crop(Image.fromarray(p), size)) for p in photos])
    return torch.from_numpy(cropped).float() / 255


def decays(name: str, tensor: torch.Tensor) -> bool:
    """Whether LAVIS's AdamW applies weight decay to this tensor (by its LAVIS name)."""
    return tensor.ndim >= 2 and not any(marker in name for marker in NO_DECAY_MARKERS)


def parameter_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """LAVIS's two AdamW groups: weight decay on the tensors `decays` picks, none on the others."""
    named = list(named)
    return [
        {"params": [t for n, t in named if decays(n, t)], "weight_decay": weight_decay},
        {"params": [t for n, t in named if not decays(n, t)], "weight_decay": 0.0},
    ]


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """DDPM's forward process at integer timesteps, with diffusers' DDPMScheduler.add_noise arithmetic."""
    abar = abar.to(latents)[timesteps].flatten()
    shape = (-1,) + (1,) * (latents.ndim - 1)
    return (abar**0.5).view(shape) * latents + ((1 - abar) ** 0.5).view(shape) * noise


@dataclass(frozen=True)
class StepDraws:
    photos: torch.Tensor  # [B] indices into the photos
    posterior_noise: torch.Tensor  # [B,4,h,w]
    noise: torch.Tensor  # [B,4,h,w]
    timesteps: torch.Tensor  # [B] in 0..999


class Draws:
    """Every random number of a run, from one CPU generator seeded with the run's seed (module docstring)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator("cpu").manual_seed(seed)

    def lora_down(self, shape: tuple[int, ...]) -> torch.Tensor:
        fan_in = math.prod(shape[1:])
        return (torch.rand(shape, generator=self.generator) * 2 - 1) / math.sqrt(fan_in)

    def step(self, photos: int, batch: int, latent_shape: tuple[int, ...]) -> StepDraws:
        g = self.generator
        index = torch.randint(photos, (batch,), generator=g)
        posterior_noise = torch.randn((batch, *latent_shape), generator=g)
        noise = torch.randn((batch, *latent_shape), generator=g)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=g)
        return StepDraws(index, posterior_noise, noise, timesteps)


@dataclass
class Posterior:
    """The VAE's diagonal Gaussian of each photo's latent: mean and std, [N, 4, h, w]."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> Posterior:
        """From the encoder's raw output [N, 8, h, w] (mean, log-variance), clamped as diffusers and LAVIS do."""
        mean, logvar = moments.float().chunk(2, dim=1)
        return cls(mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0)))

    def __len__(self) -> int:
        return self.mean.shape[0]

    def to(self, device: torch.device) -> Posterior:
        return Posterior(self.mean.to(device), self.std.to(device))

    def sample(self, photos: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.mean[photos] + self.std[photos] * noise


@contextmanager
def parameters_replaced(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Run `module` with `tensors` standing in for its parameters of those names (autograd follows them: they
    may be trained copies or computed from trained tensors). The module's own parameters are back afterwards,
    whatever happened: the host's model is shared and must never keep a half-trained weight."""
    saved = []
    try:
        for name, tensor in tensors.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = tensor  # a plain tensor: nn.Module's setattr would demand a leaf Parameter
        yield
    finally:
        for owner, leaf, parameter in reversed(saved):
            owner._parameters[leaf] = parameter


@contextmanager
def saved_activations_copied() -> Iterator[None]:
    """Autograd keeps copies of the intermediate tensors it saves for the backward pass, for modules that
    update an activation in place after using it (ComfyUI's CLIP adds its residuals in place), which autograd
    would otherwise refuse to differentiate. Costs the copies: use it for small modules."""

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone() if tensor.grad_fn is not None else tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def usable_in_autograd(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters as tensors autograd may save for the backward pass. ComfyUI loads models under
    torch.inference_mode, whose tensors autograd refuses to save; an ordinary tensor on the same memory stands in
    for each (no copy: the frozen weights are only read while a run holds them)."""
    return {n: same_memory(p) for n, p in module.named_parameters()}


def same_memory(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` detached, as an ordinary tensor even if it is an inference tensor, sharing its memory."""
    if not tensor.is_inference():
        return tensor.detach()
    view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return view.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


class LoRA:
    """A LoRA of each weight with ndim >= 2: weight + up @ down, rank `rank` (at most the weight's own), scale 1
    (alpha = rank). down starts uniform in +-1/sqrt(fan_in) from the run's draws, up at zero."""

    def __init__(
        self, weights: dict[str, torch.Tensor], names: dict[str, str], rank: int, draws: Draws, device: torch.device
    ):
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in sorted((n for n, w in weights.items() if w.ndim >= 2), key=names.__getitem__):
            shape = weights[name].shape
            r = min(rank, shape[0], math.prod(shape[1:]))
            down = draws.lora_down((r, *shape[1:])).to(device).requires_grad_()
            up = torch.zeros((shape[0], r) + (1,) * (len(shape) - 2), device=device, requires_grad=True)
            self.factors[name] = (up, down)

    def delta(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The weight change, computed as ComfyUI applies a LoRA file (same operations, same order)."""
        up, down = self.factors[name]
        return torch.mm(up.flatten(1), down.flatten(1)).reshape(shape)


Trace = Callable[[int, StepDraws, float, dict[str, torch.Tensor]], None]


class SubjectFinetune:
    """One fine-tuning run on a host's UNet and CLIP.

    unet, unet_call(z_t, t, text) -> predicted noise: the UNet module (loaded on `device`) and how to run it.
    text, text_call(subject [16, D]) -> [1, tokens, D]: the CLIP module and the caption's encoding with the
        subject vectors spliced in (not padded).
    names: UNet parameter name -> its diffusers name, for LAVIS's parameter groups, the trace and the files.
    compute_dtype: the host's precision for the UNet: float32 trains in float32; float16 or bfloat16 trains
        fp32 weights under autocast (float16 with a gradient scaler).
    """

    def __init__(
        self,
        unet: nn.Module,
        unet_call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        text: nn.Module,
        text_call: Callable[[torch.Tensor], torch.Tensor],
        posterior: Posterior,
        subject: torch.Tensor,
        settings: Settings,
        names: dict[str, str],
        device: torch.device,
        compute_dtype: torch.dtype = torch.float32,
    ):
        self.unet, self.unet_call, self.text, self.text_call = unet, unet_call, text, text_call
        self.settings, self.names, self.device = settings, names, device
        self.posterior = posterior.to(device)
        self.abar = alphas_cumprod().to(device)
        self.draws = Draws(settings.seed)
        self.text_tensors = usable_in_autograd(text)
        self.subject = subject.detach().to(device, torch.float32).reshape(1, *subject.shape[-2:]).clone()
        self.subject.requires_grad_()
        self.masters: dict[str, torch.Tensor] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        self.lora: LoRA | None = None
        if settings.mode == "unet+subject":
            self.masters = {
                n: p.detach().to(torch.float32, copy=True).requires_grad_() for n, p in unet.named_parameters()
            }
        else:
            self.frozen = usable_in_autograd(unet)
            if settings.mode == "lora+subject":
                self.lora = LoRA(self.frozen, names, settings.rank, self.draws, device)
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.trained(), settings.weight_decay),
            lr=settings.learning_rate,
            betas=BETAS,
            eps=ADAM_EPS,
            fused=device.type in FUSED_ADAM_DEVICES,  # one kernel: 4-8x faster on a CPU (measured, 20 M values)
        )
        half = compute_dtype != torch.float32
        self.autocast = torch.autocast(device.type, dtype=compute_dtype) if half else nullcontext()
        self.scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None
        self.steps_done = 0

    def trained(self) -> list[tuple[str, torch.Tensor]]:
        """The trained tensors by their LAVIS names ("unet." + diffusers name, ctx_embeddings_cache)."""
        named = [(UNET_PREFIX + self.names[n], t) for n, t in self.masters.items()]
        if self.lora is not None:
            for n, (up, down) in self.lora.factors.items():
                named += [
                    (f"{UNET_PREFIX}{self.names[n]}.lora_up", up),
                    (f"{UNET_PREFIX}{self.names[n]}.lora_down", down),
                ]
        return [*named, (SUBJECT_NAME, self.subject)]

    def unet_tensors(self) -> dict[str, torch.Tensor]:
        if self.masters:
            return self.masters
        if self.lora is None:
            return self.frozen
        return {n: w + self.lora.delta(n, w.shape) if n in self.lora.factors else w for n, w in self.frozen.items()}

    def encode_caption(self) -> torch.Tensor:
        with parameters_replaced(self.text, self.text_tensors), saved_activations_copied():
            return self.text_call(self.subject[0])

    def step(self, trace: Trace | None = None) -> float:
        """One optimizer step on a fresh batch; the batch's loss."""
        batch = self.settings.batch_size
        draws = self.draws.step(len(self.posterior), batch, tuple(self.posterior.mean.shape[1:]))
        photos, posterior_noise, noise, timesteps = (
            x.to(self.device) for x in (draws.photos, draws.posterior_noise, draws.noise, draws.timesteps)
        )
        latents = self.posterior.sample(photos, posterior_noise) * LATENT_SCALE
        noisy = add_noise(latents, noise, timesteps, self.abar)
        with self.autocast:
            text = self.encode_caption()
            with parameters_replaced(self.unet, self.unet_tensors()):
                predicted = self.unet_call(noisy, timesteps, text.expand(batch, -1, -1))
            loss = F.mse_loss(predicted.float(), noise.float())
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        self.steps_done += 1
        if trace is not None:
            trace(self.steps_done, draws, loss.item(), {n: t.grad for n, t in self.trained()})
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @torch.no_grad()
    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """unet+subject: trained minus starting weight of every UNet tensor (float32), by diffusers name."""
        start = dict(self.unet.named_parameters())
        return {self.names[n]: m - start[n].float() for n, m in self.masters.items()}

    @torch.no_grad()
    def lora_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """lora+subject: (up, down) of each LoRA'd weight, by diffusers name."""
        factors = self.lora.factors if self.lora is not None else {}
        return {self.names[n]: (up.detach(), down.detach()) for n, (up, down) in factors.items()}

    def subject_embeds(self) -> torch.Tensor:
        """The trained subject, [1, 16, D] float32 on the CPU."""
        return self.subject.detach().float().cpu()


def state_bytes(parameters: Iterable[torch.Tensor], mode: str, rank: int) -> int:
    """Memory the run keeps besides the host's own weights and the activations: fp32 trained tensors, their
    gradients and AdamW's two moments (16 bytes a value)."""
    parameters = list(parameters)
    if mode == "unet+subject":
        return 16 * sum(p.numel() for p in parameters)
    lora = 0
    if mode == "lora+subject":
        for p in parameters:
            if p.ndim >= 2:
                r = min(rank, p.shape[0], p[0].numel())
                lora += r * (p.shape[0] + p[0].numel())
    return 16 * lora


# --- the result as a weights file ComfyUI's stock LoRA loader applies ------------------------------------------

KOHYA_PREFIX = "lora_unet_"


def kohya_key(diffusers_name: str) -> str:
    """The key of a UNet tensor's module in kohya's LoRA format (ComfyUI's LoraLoader and most tools read it):
    "lora_unet_" + the diffusers module path with dots as underscores."""
    return KOHYA_PREFIX + diffusers_name.rsplit(".", 1)[0].replace(".", "_")


def diff_tensors(deltas: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weight changes by diffusers name -> a weight-difference file: "<key>.diff" for weights, "<key>.diff_b"
    for biases (ComfyUI's LoRA loader adds them to the model's tensors)."""
    suffix = {"weight": ".diff", "bias": ".diff_b"}
    out = {}
    for name, delta in deltas.items():
        kind = name.rsplit(".", 1)[1]
        if kind not in suffix:
            raise ValueError(f"UNet tensor {name}: only weights and biases can be written as differences")
        out[kohya_key(name) + suffix[kind]] = delta.detach().to("cpu", dtype).contiguous()
    return out


def lora_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """LoRA factors by diffusers weight name -> kohya's "<key>.lora_up.weight", ".lora_down.weight" and
    ".alpha" (= the rank: scale 1)."""
    out = {}
    for name, (up, down) in factors.items():
        key = kohya_key(name)
        out[f"{key}.lora_up.weight"] = up.detach().to("cpu", torch.float32).contiguous()
        out[f"{key}.lora_down.weight"] = down.detach().to("cpu", torch.float32).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out
