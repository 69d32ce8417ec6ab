"""blip_core/finetune.py, lavis_checkpoint.py and loss_curve.py: the recipe's pieces on small pure-torch stand-ins
(the real UNet and CLIP run in tests/comfy/test_finetune.py against diffusers)."""

from __future__ import annotations

import gc
import math

import numpy as np
import psutil
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from blip_diffusion_nodes.blip_core.finetune import (
    LATENT_SCALE,
    SUBJECT_NAME,
    Draws,
    Posterior,
    Settings,
    SubjectFinetune,
    add_noise,
    caption,
    crop_photos,
    decays,
    diff_tensors,
    kohya_key,
    lora_tensors,
    parameter_groups,
    parameters_replaced,
    saved_activations_copied,
    state_bytes,
    usable_in_autograd,
)
from blip_diffusion_nodes.blip_core.lavis_checkpoint import read_lavis_checkpoint
from blip_diffusion_nodes.blip_core.loss_curve import as_comfy_image, loss_curve_image
from blip_diffusion_nodes.blip_core.sampling import alphas_cumprod


def test_parameter_groups_are_lavis_rule():
    named = [
        ("unet.conv_in.weight", torch.zeros(4, 4, 3, 3)),
        ("unet.conv_in.bias", torch.zeros(4)),
        ("unet.down_blocks.0.resnets.0.norm1.weight", torch.zeros(4)),
        ("unet.x.ln_final.weight", torch.zeros(4, 4)),  # "ln" in the name: no decay even at ndim 2
        ("unet.x.bn.weight", torch.zeros(4, 4)),
        (SUBJECT_NAME, torch.zeros(1, 16, 8)),
    ]
    decay, no_decay = parameter_groups(named, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [id(t) for t in decay["params"]] == [id(named[0][1]), id(named[5][1])]
    assert len(no_decay["params"]) == 4
    assert decays(SUBJECT_NAME, named[5][1]) and not decays("a.bias", torch.zeros(2, 2))


def test_add_noise_is_ddpm_with_diffusers_arithmetic():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    abar = alphas_cumprod()
    expected = torch.stack([abar[i] ** 0.5 * latents[k] + (1 - abar[i]) ** 0.5 * noise[k] for k, i in enumerate(t)])
    assert torch.equal(add_noise(latents, noise, t, abar), expected)


def test_draws_are_the_documented_ones():
    draws = Draws(42)
    first = draws.step(5, 3, (4, 8, 8))
    g = torch.Generator("cpu").manual_seed(42)
    assert torch.equal(first.photos, torch.randint(5, (3,), generator=g))
    assert torch.equal(first.posterior_noise, torch.randn((3, 4, 8, 8), generator=g))
    assert torch.equal(first.noise, torch.randn((3, 4, 8, 8), generator=g))
    assert torch.equal(first.timesteps, torch.randint(0, 1000, (3,), generator=g))
    second = draws.step(5, 3, (4, 8, 8))
    assert torch.equal(second.photos, torch.randint(5, (3,), generator=g))


def test_photos_are_cropped_as_torchvision_does():
    g = torch.Generator().manual_seed(1)
    wide, tall = torch.rand(1, 60, 100, 3, generator=g), torch.rand(2, 90, 70, 3, generator=g)
    out = crop_photos([wide, tall[:, :, :, :1], torch.rand(0, 8, 8, 3)], 64)
    assert out.shape == (3, 64, 64, 3) and out.dtype == torch.float32
    pixels = (wide[0] * 255).round().to(torch.uint8).numpy()
    resized = Image.fromarray(pixels).resize((int(64 * 100 / 60), 64), Image.BICUBIC)  # short side to 64
    left = int(round((resized.size[0] - 64) / 2.0))
    expected = np.asarray(resized.crop((left, 0, left + 64, 64))).astype(np.float32) / 255
    assert np.array_equal(out[0].numpy(), expected)
    assert torch.equal(out[1][..., 0], out[1][..., 2])  # gray becomes RGB
    with pytest.raises(ValueError, match="images: no photos"):
        crop_photos([torch.rand(0, 8, 8, 3)], 64)


def test_caption_is_cleaned_as_lavis_does():
    assert caption("Dog") == "a dog"
    assert caption("teddy (bear):1.2!") == "a teddy bear 1 2"


def test_posterior_from_moments():
    moments = torch.cat([torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), -50.0)], dim=1)
    posterior = Posterior.from_moments(moments)
    assert torch.allclose(posterior.std, torch.full((1, 4, 2, 2), math.exp(-15.0)))  # log-variance clamped at -30
    assert torch.equal(posterior.sample(torch.tensor([0, 0]), torch.zeros(2, 4, 2, 2)), torch.ones(2, 4, 2, 2))


def test_replaced_parameters_carry_gradients_and_are_put_back():
    with torch.inference_mode():
        layer = nn.Linear(3, 2)
    original = layer.weight
    trained = torch.zeros(2, 3, requires_grad=True)
    with parameters_replaced(layer, {"weight": trained}):
        layer(torch.ones(1, 3)).sum().backward()
    assert layer.weight is original and torch.equal(trained.grad, torch.ones(2, 3))
    with pytest.raises(RuntimeError), parameters_replaced(layer, {"weight": trained}):
        raise RuntimeError("cancelled")
    assert layer.weight is original


def test_frozen_weights_of_inference_mode_are_used_without_a_copy():
    """Light modes must not double the UNet in memory: the stand-ins share the inference tensors' memory."""
    with torch.inference_mode():
        layer = nn.Linear(3, 2)
    frozen = usable_in_autograd(layer)
    assert not frozen["weight"].is_inference()
    assert frozen["weight"].data_ptr() == layer.weight.data_ptr() and torch.equal(frozen["weight"], layer.weight)
    x = torch.ones(1, 3, requires_grad=True)
    with parameters_replaced(layer, frozen):
        layer(x).sum().backward()  # autograd saves the weight: an inference tensor would be refused
    assert torch.equal(x.grad, layer.weight.sum(0, keepdim=True))


class InPlaceResidual(nn.Module):
    """x += f(norm(x)): the shape of ComfyUI's CLIP layers, which autograd refuses without copies."""

    def __init__(self):
        super().__init__()
        self.norm, self.linear = nn.LayerNorm(4), nn.Linear(4, 4)

    def forward(self, x):
        x = x * 1.0
        x += self.linear(self.norm(x))
        x += self.linear(self.norm(x))
        return x


def test_saved_activations_copied_makes_in_place_residuals_differentiable():
    module, x = InPlaceResidual(), torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        module(x).sum().backward()
    with saved_activations_copied():
        y = module(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


class ToyUNet(nn.Module):
    """A stand-in with the UNet's call: (z_t, t, text) -> predicted noise."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.proj = nn.Linear(width, 4)

    def forward(self, z, t, text):
        return self.conv_in(self.norm(z)) + self.proj(text.mean(1))[:, :, None, None] + 1e-4 * t[:, None, None, None]


class ToyText(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, subject):
        return self.linear(subject)[None]


def toy_models() -> tuple[ToyUNet, ToyText]:
    torch.manual_seed(0)
    with torch.inference_mode():  # as ComfyUI loads its models
        return ToyUNet(), ToyText()


def toy_posterior() -> Posterior:
    g = torch.Generator().manual_seed(0)
    return Posterior(torch.randn(3, 4, 4, 4, generator=g), torch.full((3, 4, 4, 4), 0.1))


def toy_subject() -> torch.Tensor:
    return torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(1))


def toy_run(mode: str, steps: int = 1, lr: float = 1e-2, seed: int = 0):
    unet, text = toy_models()
    names = {n: n for n, _ in unet.named_parameters()}
    trainer = SubjectFinetune(
        unet,
        unet,
        text,
        text,
        toy_posterior(),
        toy_subject(),
        Settings(steps=steps, learning_rate=lr, batch_size=2, mode=mode, rank=2, seed=seed),
        names,
        torch.device("cpu"),
    )
    before = {n: p.clone() for n, p in unet.named_parameters()}
    losses = [trainer.step() for _ in range(steps)]
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())  # the host's module never changes
    return trainer, losses


def test_unet_mode_trains_every_tensor_and_the_subject():
    trainer, losses = toy_run("unet+subject", steps=30)
    deltas = trainer.weight_deltas()
    assert set(deltas) == {"conv_in.weight", "conv_in.bias", "norm.weight", "norm.bias", "proj.weight", "proj.bias"}
    assert all(d.abs().max() > 0 for d in deltas.values())
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_one_step_is_the_recipe_by_hand():
    """The first step of unet+subject equals the recipe written out: the draws, the posterior sample, DDPM
    noising, the MSE on the noise and AdamW with LAVIS's groups."""
    trainer, (loss,) = toy_run("unet+subject", steps=1, lr=1e-3, seed=3)
    unet, text = toy_models()
    weights = {n: p.detach().clone().requires_grad_() for n, p in unet.named_parameters()}
    subject = toy_subject().requires_grad_()
    draws, posterior = Draws(3).step(3, 2, (4, 4, 4)), toy_posterior()
    latents = (posterior.mean[draws.photos] + posterior.std[draws.photos] * draws.posterior_noise) * LATENT_SCALE
    noisy = add_noise(latents, draws.noise, draws.timesteps, alphas_cumprod())
    with (
        parameters_replaced(unet, weights),
        parameters_replaced(text, {n: p.clone() for n, p in text.named_parameters()}),
    ):
        predicted = unet(noisy, draws.timesteps, text(subject[0]).expand(2, -1, -1))
    expected = F.mse_loss(predicted, draws.noise)
    expected.backward()
    named = [(f"unet.{n}", w) for n, w in weights.items()] + [(SUBJECT_NAME, subject)]
    torch.optim.AdamW(parameter_groups(named, 0.01), lr=1e-3, betas=(0.9, 0.999), eps=1e-8).step()
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    for name, weight in weights.items():
        torch.testing.assert_close(trainer.masters[name], weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(trainer.subject, subject, rtol=1e-6, atol=1e-7)


def test_lora_mode_trains_factors_only():
    trainer, _ = toy_run("lora+subject", steps=3)
    factors = trainer.lora_factors()
    assert set(factors) == {"conv_in.weight", "proj.weight"}  # ndim >= 2 only
    up, down = factors["conv_in.weight"]
    assert up.shape == (4, 2, 1, 1) and down.shape == (2, 4, 3, 3) and up.abs().max() > 0
    tensors = lora_tensors(factors)
    assert tensors["lora_unet_conv_in.alpha"].item() == 2.0 and tensors["lora_unet_proj.lora_up.weight"].shape == (4, 2)


def test_subject_mode_trains_the_subject_alone():
    trainer, _ = toy_run("subject", steps=2)
    assert trainer.weight_deltas() == {} and trainer.lora_factors() == {}
    assert trainer.subject.grad is None and trainer.subject_embeds().shape == (1, 16, 8)


def test_weight_difference_keys():
    assert kohya_key("down_blocks.0.attentions.0.proj_in.weight") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    out = diff_tensors({"conv_in.weight": torch.ones(2, 2), "conv_in.bias": torch.ones(2)}, torch.float16)
    assert set(out) == {"lora_unet_conv_in.diff", "lora_unet_conv_in.diff_b"}
    assert out["lora_unet_conv_in.diff"].dtype == torch.float16


def test_settings_are_checked():
    with pytest.raises(ValueError, match="learning_rate: expected a finite number"):
        Settings(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="train: 'dreambooth' is not one of"):
        Settings(mode="dreambooth")
    with pytest.raises(ValueError, match="steps: expected 1 or more"):
        Settings(steps=0)


def test_state_bytes_per_mode():
    params = [torch.zeros(10, 20), torch.zeros(10)]
    assert state_bytes(params, "unet+subject", 4) == 16 * 210
    assert state_bytes(params, "lora+subject", 4) == 16 * 4 * 30
    assert state_bytes(params, "subject", 4) == 0


# --- LAVIS checkpoints ---------------------------------------------------------------------------------------


def write_checkpoint(path, model: dict, **extra) -> None:
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "epoch": 39, **extra}, path)


def test_lavis_checkpoint_layout(tmp_path):
    cache = torch.randn(1, 16, 768)
    model = {
        "unet.conv_in.weight": torch.randn(320, 4, 3, 3),
        SUBJECT_NAME: cache,
        "text_encoder.text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    config = {"datasets": {"blip_diffusion_finetune": {"build_info": {"subject_text": "dog"}}}}
    write_checkpoint(tmp_path / "checkpoint_39.pth", model, config=config)
    read = read_lavis_checkpoint(tmp_path / "checkpoint_39.pth")
    assert list(read.unet) == ["conv_in.weight"] and torch.equal(read.subject, cache) and read.category == "dog"
    write_checkpoint(tmp_path / "no_config.pth", model)
    assert read_lavis_checkpoint(tmp_path / "no_config.pth").category is None


def test_lavis_checkpoint_refusals(tmp_path):
    write_checkpoint(tmp_path / "sd.ckpt", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="holds no unet.* weights .a Stable Diffusion checkpoint"):
        read_lavis_checkpoint(tmp_path / "sd.ckpt")
    model = {"unet.conv_in.weight": torch.zeros(2), SUBJECT_NAME: torch.ones(1, 16, 8)}
    write_checkpoint(tmp_path / "text.pth", model, config={"model": {"sd_train_text_encoder": True}})
    with pytest.raises(ValueError, match="also fine-tuned the text encoder"):
        read_lavis_checkpoint(tmp_path / "text.pth")
    write_checkpoint(tmp_path / "zeros.pth", model | {SUBJECT_NAME: torch.zeros(1, 16, 8)})
    with pytest.raises(ValueError, match="all zeros"):
        read_lavis_checkpoint(tmp_path / "zeros.pth")
    torch.save({"model": model, "hook": print}, tmp_path / "code.pth")
    with pytest.raises(ValueError, match="weights_only=True rejected it"):
        read_lavis_checkpoint(tmp_path / "code.pth")


def test_lavis_optimizer_state_is_never_read(tmp_path):
    """A checkpoint with 400 MB of optimizer state: reading it costs far less memory than that (it is mapped, not
    read, and dropped)."""
    path = tmp_path / "big.pth"
    model = {"unet.conv_in.weight": torch.randn(320, 4, 3, 3), SUBJECT_NAME: torch.randn(1, 16, 768)}
    optimizer = {"state": {0: {"exp_avg": torch.ones(50_000_000), "exp_avg_sq": torch.ones(50_000_000)}}}
    torch.save({"model": model, "optimizer": optimizer}, path)
    del optimizer
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    read = read_lavis_checkpoint(path)
    grown = process.memory_info().rss - before
    assert read.unet["conv_in.weight"].shape == (320, 4, 3, 3)
    assert grown < 40_000_000, grown


def test_loss_curve_image():
    image = loss_curve_image([1.0, 0.8, 0.9, 0.5], total_steps=40)
    tensor = as_comfy_image(image)
    assert tensor.shape == (1, 320, 512, 3) and tensor.dtype == torch.float32 and 0 <= tensor.min() <= tensor.max() <= 1
    assert as_comfy_image(loss_curve_image([])).shape == (1, 320, 512, 3)
