"""The reference sampler: diffusers' PNDMScheduler in PLMS mode, as BLIP-Diffusion ships it.

Written in ComfyUI's "VE" form, x = x0 + sigma * eps, with sigma_t = sqrt((1 - abar_t) / abar_t);
diffusers' "VP" sample is z_t = sqrt(abar_t) * x. The DDIM-shaped PLMS update
z_prev = f(z_t, eps') is exactly x_prev = x_t + (sigma_prev - sigma_t) * eps' in VE form.

Schedule (scaled_linear betas 0.00085 -> 0.012, 1000 steps, "leading" spacing,
set_alpha_to_one=False, skip_prk_steps=True): e.g. 25 steps give the timesteps
960, 920, 920, 880, ..., 40, 0. The repeated 920 is a Heun-like correction of the first
step; the last call (t=0 -> the final alpha, which equals abar_0) changes nothing, so
it is skipped here and the sampler needs one model call fewer than the reference.
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


def reference_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, steps_offset: int = 0) -> list[int]:
    """Distinct timesteps of PNDMScheduler.set_timesteps(steps) with "leading" spacing, high to low."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ratio = num_train_timesteps // steps
    return [i * ratio + steps_offset for i in reversed(range(steps))]


def sigma_from_alpha(abar: torch.Tensor) -> torch.Tensor:
    abar = abar.double()
    return ((1 - abar) / abar).sqrt()


def reference_sigmas(steps: int, final_alpha_cumprod: float | None = None, **schedule) -> torch.Tensor:
    """VE sigmas [sigma(t_0), ..., sigma(t_{N-1}), sigma_final] of the reference schedule.

    sigma_final belongs to `final_alpha_cumprod` (default abar_0, as set_alpha_to_one=False).
    """
    abar = alphas_cumprod(**schedule)
    t = reference_timesteps(steps, num_train_timesteps=abar.shape[0])
    final = abar[0] if final_alpha_cumprod is None else torch.tensor(final_alpha_cumprod)
    return sigma_from_alpha(torch.cat([abar[t], final.reshape(1)])).float()


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


@torch.no_grad()
def sample_plms(
    eps_fn: EpsFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """PLMS from sigmas[0] to sigmas[-1] on a VE sample; eps_fn(x, sigma) predicts the noise.

    callback(i, x, denoised) follows each step. A step between two equal sigmas changes
    nothing and costs no model call.
    """
    history: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if sigma_next == sigma:
            if callback is not None:
                callback(i, x, x)
            continue
        eps = eps_fn(x, sigma)
        if not history:
            # PNDM's start without Runge-Kutta: Euler, then redo the step with the eps average
            # (not possible when the step ends at sigma 0, where eps is undefined).
            history.append(eps)
            if sigma_next > 0:
                eps = (eps + eps_fn(x + (sigma_next - sigma) * eps, sigma_next)) / 2
        else:
            history = history[-3:] + [eps]
            eps = _plms_combine(history)
        if callback is not None:
            callback(i, x, x - sigma * eps)
        x = x + (sigma_next - sigma) * eps
    return x
