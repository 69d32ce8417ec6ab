"""The core against tensors the real diffusers reference produced (tests/fixtures/core_parity.npz).

Regenerate the fixture with `make fixtures` (runs tools/reference/make_parity_fixtures.py
in the pinned reference venv).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip_diffusion_nodes.blip_core.bert_tokenizer import tokenize_subjects
from blip_diffusion_nodes.blip_core.preprocess import preprocess
from blip_diffusion_nodes.blip_core.prompt import build_prompt
from blip_diffusion_nodes.blip_core.sampling import (
    DDIM_OFFSET,
    alphas_cumprod,
    invert_ddim,
    reference_sigmas,
    reference_timesteps,
    sample_ddim,
    sample_plms,
)
from blip_diffusion_nodes.blip_core.subject_encoder import load_subject_encoder
from blip_diffusion_nodes.tools.context_clip import load_text_encoder

ATOL = 1e-5


def plms_call_timesteps(steps: int) -> list[int]:
    """The timesteps at which the reference calls the model: PNDM evaluates the second one twice."""
    t = reference_timesteps(steps)
    return t[:1] + t[1:2] + t[1:] if len(t) > 1 else t


def case_names(fixture):
    return [c["name"] for c in fixture.meta["cases"]]


def comfy_images(fixture, case) -> torch.Tensor:
    """The case's uint8 images as a ComfyUI IMAGE batch (float 0..1, [B,H,W,C])."""
    arrays = [fixture[f"{case['name']}/image{i}"] for i in range(len(case["subjects"]))]
    return torch.from_numpy(np.stack(arrays)).float() / 255


@pytest.fixture(scope="module")
def encoder(micro_model):
    return load_subject_encoder(micro_model)


@pytest.fixture(scope="module")
def text_encoder(micro_model):
    return load_text_encoder(micro_model)


@pytest.fixture(params=["square", "wide", "rgba", "gray", "pair"])
def case(request, core_fixture):
    return next(c for c in core_fixture.meta["cases"] if c["name"] == request.param)


def test_pixel_values_exact(core_fixture, case):
    pixels = preprocess(comfy_images(core_fixture, case), "squash")
    assert torch.equal(pixels, torch.from_numpy(core_fixture[f"{case['name']}/pixel_values"]))


def test_bert_ids_exact(core_fixture, case):
    ids, _ = tokenize_subjects(case["subjects"])
    assert ids.tolist() == core_fixture[f"{case['name']}/bert_ids"].tolist()


def test_query_embeddings(core_fixture, case, encoder):
    out = encoder.encode(comfy_images(core_fixture, case), case["subjects"])
    ref = torch.from_numpy(core_fixture[f"{case['name']}/query_embeds"])
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= ATOL


def test_prompt_and_clip_ids(core_fixture, case, text_encoder):
    prompts = [build_prompt(case["prompt"], case["target"], case["strength"]) for _ in case["subjects"]]
    assert prompts == case["built_prompts"]
    ref_ids = core_fixture[f"{case['name']}/clip_ids"].tolist()
    for prompt, ref in zip(prompts, ref_ids):
        layout = text_encoder.layout(prompt, num_context=16)
        assert [t for t in layout if t is not None] == ref  # 61 ids around the 16 context slots
        assert layout[2:18] == [None] * 16 and len(layout) == 77


def test_cond_and_uncond_embeddings(core_fixture, case, text_encoder):
    name = case["name"]
    ctx = torch.from_numpy(core_fixture[f"{name}/query_embeds"])
    cond = text_encoder.encode(case["built_prompts"], ctx=ctx, ctx_begin_pos=2)
    assert (cond - torch.from_numpy(core_fixture[f"{name}/cond"])).abs().max().item() <= ATOL
    negatives = [core_fixture.meta["negative"]] * len(case["subjects"])
    uncond = text_encoder.encode(negatives)
    assert (uncond - torch.from_numpy(core_fixture[f"{name}/uncond"])).abs().max().item() <= ATOL


def test_schedule_exact(core_fixture):
    assert torch.equal(alphas_cumprod(), torch.from_numpy(core_fixture["schedule/alphas_cumprod"]))
    for steps in (1, 2, 3, 25, 50):
        assert plms_call_timesteps(steps) == core_fixture[f"schedule/timesteps_{steps}"].tolist()


def synthetic_eps(z: torch.Tensor, t: int, weight: torch.Tensor) -> torch.Tensor:
    """The same stand-in UNet the fixture tool ran through diffusers' PNDMScheduler."""
    return torch.tanh(torch.einsum("ij,bjhw->bihw", weight, z) * (1 + t / 1000))


@pytest.mark.parametrize("steps", [3, 25])
def test_plms_matches_diffusers_scheduler(core_fixture, steps):
    """Our VE-form PLMS (with the no-op last call skipped) reproduces PNDMScheduler.step in VP form."""
    weight = torch.from_numpy(core_fixture[f"plms_{steps}/weight"])
    z_init = torch.from_numpy(core_fixture[f"plms_{steps}/z_init"])
    abar = alphas_cumprod().double()
    sigmas = reference_sigmas(steps).double()
    table = ((1 - abar) / abar).sqrt()
    calls = []

    def eps_fn(x, sigma):
        t = int((table - sigma).abs().argmin())
        calls.append(t)
        z = x / (1 + sigma**2).sqrt()
        return synthetic_eps(z.float(), t, weight).double()

    x = z_init.double() * (1 + sigmas[0] ** 2).sqrt()
    x = sample_plms(eps_fn, x, sigmas)
    z_final = x / (1 + sigmas[-1] ** 2).sqrt()
    assert calls == plms_call_timesteps(steps)[:-1]  # the reference's last call is a no-op
    ref = torch.from_numpy(core_fixture[f"plms_{steps}/z_final"]).double()
    assert (z_final - ref).abs().max().item() <= 1e-4


def traced(fixture, steps: int, kind: str, loop, sigmas: torch.Tensor) -> float:
    """max |ours - diffusers| over every step of a DDIM or inversion run on the synthetic predictor, relative to
    the range of the reference's samples."""
    weight = torch.from_numpy(fixture[f"ddim_{steps}/weight"])
    table = training_table()
    sigmas = sigmas.double()
    seen = []

    def eps_fn(x, sigma):
        t = int((table - sigma).abs().argmin())
        return synthetic_eps((x / (1 + sigma**2).sqrt()).float(), t, weight).double()

    def record(i, x, denoised):
        seen.append(x)

    x = torch.from_numpy(fixture[f"ddim_{steps}/z_init"]).double() * (1 + sigmas[0] ** 2).sqrt()
    x = loop(eps_fn, x, sigmas, record)
    ours = [*seen[1:], x]  # the sample after each step
    worst = 0.0
    for i, (sample, sigma) in enumerate(zip(ours, sigmas[1:])):
        ref = torch.from_numpy(fixture[f"ddim_{steps}/{kind}_{i}"]).double()
        z = sample / (1 + sigma**2).sqrt()
        worst = max(worst, ((z - ref).abs().max() / (ref.max() - ref.min())).item())
    return worst


def training_table() -> torch.Tensor:
    abar = alphas_cumprod().double()
    return ((1 - abar) / abar).sqrt()


@pytest.mark.parametrize("steps", [3, 25])
def test_ddim_matches_diffusers_scheduler_step_by_step(core_fixture, steps):
    assert reference_timesteps(steps, DDIM_OFFSET) == core_fixture[f"ddim_{steps}/ddim_timesteps"].tolist()
    assert traced(core_fixture, steps, "ddim", sample_ddim, reference_sigmas(steps, DDIM_OFFSET)) <= 1e-4


@pytest.mark.parametrize("steps", [3, 25])
def test_inversion_matches_ddim_inverse_scheduler_step_by_step(core_fixture, steps):
    """Each step evaluates eps at the level it steps to, on the sample of the level it leaves."""
    assert reference_timesteps(steps, DDIM_OFFSET)[::-1] == core_fixture[f"ddim_{steps}/inverse_timesteps"].tolist()
    sigmas = reference_sigmas(steps, DDIM_OFFSET).flip(0)
    assert traced(core_fixture, steps, "inverse", invert_ddim, sigmas) <= 1e-4
