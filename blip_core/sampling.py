"""The reference samplers: PLMS (diffusers' PNDMScheduler, as BLIP-Diffusion ships it), DDIM with
eta 0 and DDIM inversion (diffusers' DDIMScheduler / DDIMInverseScheduler, as LAVIS's editing uses them).

Written in ComfyUI's "VE" form, x = x0 + sigma * eps, with sigma_t = sqrt((1 - abar_t) / abar_t);
diffusers' "VP" sample is z_t = sqrt(abar_t) * x. A DDIM update z_prev = f(z_t, eps) is exactly
x_prev = x_t + (sigma_prev - sigma_t) * eps in VE form, so all three are short loops over sigmas.

Schedules (scaled_linear betas 0.00085 -> 0.012, 1000 steps, "leading" spacing,
set_alpha_to_one=False, so the last level is abar_0, not 1):
- PLMS, steps_offset 0 (the release's scheduler config): 25 steps give the timesteps
  960, 920, 920, 880, ..., 40, 0. The repeated 920 is a Heun-like correction of the first
  step; the last call (t=0 -> abar_0) changes nothing, so it is skipped here unless the caller
  needs that call (LocalBlend does) and the sampler needs one model call fewer than the reference.
- DDIM, steps_offset 1 (SD-1.5's DDIM config): 50 steps give 981, 961, ..., 1, then abar_0.
  Inversion walks the same levels upwards, evaluating eps at the level it steps to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


def alphas_cumprod(
    beta_start: float = BETA_START, beta_end: float = BETA_END, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """abar_t for t = 0..999, with diffusers' float32 arithmetic."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


PLMS_OFFSET = 0  # steps_offset of the release's PNDMScheduler config
DDIM_OFFSET = 1  # steps_offset of SD-1.5's DDIMScheduler config, which LAVIS's editing and inversion use


def reference_timesteps(steps: int, steps_offset: int = PLMS_OFFSET) -> list[int]:
    """Distinct timesteps of the scheduler's set_timesteps(steps) with "leading" spacing, high to low."""
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"the reference schedule has 1 to {NUM_TRAIN_TIMESTEPS} distinct timesteps; {steps} were asked for"
        )
    ratio = NUM_TRAIN_TIMESTEPS // steps
    return [i * ratio + steps_offset for i in reversed(range(steps))]


def sigma_from_alpha(abar: torch.Tensor) -> torch.Tensor:
    abar = abar.double()
    return ((1 - abar) / abar).sqrt()


def training_sigmas() -> torch.Tensor:
    """sigma(t) for t = 0..999: SD-1.5's noise schedule in VE form."""
    return sigma_from_alpha(alphas_cumprod()).float()


def reference_sigmas(steps: int, steps_offset: int = PLMS_OFFSET) -> torch.Tensor:
    """VE sigmas [sigma(t_0), ..., sigma(t_{N-1}), sigma(abar_0)] of the reference schedule, high to low
    (set_alpha_to_one=False: the last level is abar_0)."""
    abar = alphas_cumprod()
    t = reference_timesteps(steps, steps_offset)
    return sigma_from_alpha(torch.cat([abar[t], abar[:1]])).float()


def starts_from_noise(sigmas: torch.Tensor) -> bool:
    """Whether sampling on `sigmas` starts from pure noise (text-to-image) rather than a noised latent.

    The reference starts text-to-image from unit-variance noise whatever its first timestep, while
    img2img (denoise < 1) starts lower in a longer schedule. So a schedule counts as a full one when
    it starts at least as high as the reference schedule of as many steps; ComfyUI's full schedules
    start at sigma_max, higher still, and it too draws unit-variance noise for those.
    """
    steps = min(len(sigmas) - 1, NUM_TRAIN_TIMESTEPS)
    return steps >= 1 and float(sigmas[0]) >= float(reference_sigmas(steps)[0]) * (1 - 1e-6)


def _plms_combine(history: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the stored eps, newest last (as PNDMScheduler.step_plms)."""
    e = history
    if len(e) == 1:
        return e[-1]
    if len(e) == 2:
        return (3 * e[-1] - e[-2]) / 2
    if len(e) == 3:
        return (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
    return (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
StepHook = Callable[[torch.Tensor], torch.Tensor]


def _keep(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def sample_plms(
    eps_fn: EpsFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
    after_step: StepHook | None = None,
) -> torch.Tensor:
    """PLMS from sigmas[0] to sigmas[-1] on a VE sample; eps_fn(x, sigma) predicts the noise.

    callback(i, x, denoised) follows each step. `after_step(x)` may change the sample after each
    model call's update, where diffusers' pipelines run a step callback (LocalBlend): after the
    predictor step of PNDM's start too. A step between two equal sigmas changes nothing: without
    `after_step` it costs no model call; with it, the model is still called (the hook may watch the
    call) and the hook applied, as the reference's last no-op step does.
    """
    hook = after_step or _keep
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == sigma:
            if after_step is not None:
                eps_fn(x, sigma)
                x = hook(x)
            if callback is not None:
                callback(i, x, x)
            continue
        eps = eps_fn(x, sigma)
        if not history:
            # PNDM's start without Runge-Kutta: Euler, then redo the step with the eps average
            # (not possible when the step ends at sigma 0, where eps is undefined).
            history.append(eps)
            if sigma_next > 0:
                eps = (eps + eps_fn(hook(x + (sigma_next - sigma) * eps), sigma_next)) / 2
        else:
            history = history[-3:] + [eps]
            eps = _plms_combine(history)
        if callback is not None:
            callback(i, x, x - sigma * eps)
        x = hook(x + (sigma_next - sigma) * eps)
    return x


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
    after_step: StepHook | None = None,
) -> torch.Tensor:
    """DDIM (eta 0) from sigmas[0] to sigmas[-1] on a VE sample: one model call per step.
    callback and after_step as in sample_plms."""
    hook = after_step or _keep
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = eps_fn(x, sigma)
        if callback is not None:
            callback(i, x, x - sigma * eps)
        x = hook(x + (sigma_next - sigma) * eps)
    return x


@torch.no_grad()
def invert_ddim(eps_fn: EpsFn, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None) -> torch.Tensor:
    """DDIM inversion up the ascending `sigmas`, as diffusers' DDIMInverseScheduler: each step evaluates eps
    at the level it steps to, on the sample of the level it leaves (the same VP sample z_i, so the VE
    input is rescaled to the new sigma), then moves along that eps: x_{i+1} = x_i + (s_{i+1} - s_i) eps.
    (ComfyUI's FlipSigmas + euler evaluates eps at the level it leaves: another algorithm.)"""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = eps_fn(x * ((1 + sigma_next**2) / (1 + sigma**2)).sqrt(), sigma_next)
        if callback is not None:
            callback(i, x, x - sigma * eps)
        x = x + (sigma_next - sigma) * eps
    return x
