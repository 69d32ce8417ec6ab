"""Real photos in: DDIM inversion and the reference DDIM sampler through the real server, against diffusers'
DDIMInverseScheduler and DDIMScheduler (run in the reference venv) on the same weights and photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from blip_diffusion_nodes.blip_core.sampling import DDIM_OFFSET, reference_sigmas
from blip_diffusion_nodes.tests.graphs import NEGATIVE, inversion, probe, shrink, twin

PROMPT = "a cat sitting on a sofa"
STEPS = 4
SCALE = 0.18215  # SD-1.5's latent scale: ComfyUI LATENTs are unscaled


@pytest.fixture(scope="module")
def photo(comfy) -> str:
    """The example cat at 64x64 (the tiny model's latent is then 8x8)."""
    image = Image.open(comfy.base / "input" / "blipd_example_cat.jpg").convert("RGB").resize((64, 64), Image.BICUBIC)
    return comfy.put_input("blipd_test_inversion.png", np.asarray(image))


def run_probed(comfy, graph, name: str) -> dict[str, torch.Tensor]:
    """Run `graph` with the photo's latent, the inverted latent and the result probed."""
    probe(graph, "20", f"{name}_photo", latent=["3", 0])
    probe(graph, "21", f"{name}_inverted", latent=["6", 0])
    probe(graph, "22", f"{name}_final", latent=["7", 0])
    entry = comfy.run_ok(graph)
    out = {kind: comfy.probe(f"{name}_{kind}")[0]["latent"] for kind in ("photo", "inverted", "final")}
    out["image"] = comfy.image(entry, "9")
    return out


def as_vp(inverted: torch.Tensor, steps: int) -> np.ndarray:
    """The pack's inverted LATENT (ComfyUI's noised-latent form x0 + sigma*eps, unscaled) as diffusers' VP sample."""
    sigma = reference_sigmas(steps, DDIM_OFFSET)[0].double()
    return (inverted.double() * SCALE / (1 + sigma**2).sqrt()).numpy()


@pytest.mark.reference
def test_inversion_and_ddim_match_diffusers(comfy, tiny_model, photo, reference):
    ref = reference(
        "run_inversion.py",
        model=str(comfy.base / "models" / "blip_diffusion" / tiny_model),
        image=str(comfy.base / "input" / photo),
        prompt=PROMPT,
        negative=NEGATIVE,
        steps=STEPS,
        guidance=7.5,
    )
    ours = run_probed(comfy, inversion(tiny_model, photo, PROMPT, steps=STEPS, prefix="inv_parity"), "inv_parity")
    z0 = ours["photo"].double().numpy() * SCALE
    assert np.abs(z0 - ref["z0"]).max() <= 1e-4 * np.ptp(ref["z0"])  # the same photo latent (the VAE's mode)
    inverted, expected = as_vp(ours["inverted"], STEPS), ref[f"inverted_{STEPS - 1}"]
    inverted_err = np.abs(inverted - expected).max() / np.ptp(expected)
    final_err = np.abs(ours["final"].numpy() - ref["latents_final"]).max() / np.ptp(ref["latents_final"])
    theirs = np.clip(ref["image"] * 255, 0, 255).astype(np.uint8).astype(np.float64)
    diff = np.abs(ours["image"].astype(np.float64) - theirs)
    print(
        f"\ninversion parity: inverted max|d| {inverted_err:.1e} of its range, DDIM final latent {final_err:.1e}, "
        f"image mean |d| {diff.mean():.3f}/255, max {diff.max():.0f}/255"
    )
    assert inverted_err <= 1e-4
    assert final_err <= 1e-3
    assert diff.mean() <= 2.0


def test_reconstruction_converges_with_steps(comfy, tiny_model, photo):
    """Inversion, then the reference DDIM with the same prompt at guidance 1, gives back the photo's latent up to
    the discretisation error, which shrinks with the step count (DDIM is first order). A random tiny UNet's noise
    prediction changes fast with its input, so the round trip is looser than with trained weights: about 0.3 of
    the latent's spread at 50 steps here."""
    errors = {}
    for steps in (10, 50):
        graph = inversion(tiny_model, photo, PROMPT, steps=steps, cfg=1.0, prefix=f"inv_recon{steps}")
        ours = run_probed(comfy, graph, f"inv_recon{steps}")
        errors[steps] = (ours["final"] - ours["photo"]).abs().mean().item()
        spread = ours["photo"].std().item()
        print(f"\nreconstruction, {steps} steps: mean |d| {errors[steps]:.4f} (the photo latent's std {spread:.4f})")
    assert errors[50] < errors[10] / 3
    assert errors[50] < 0.5 * spread


def test_the_example_workflow_runs(comfy):
    entry = comfy.run_ok(shrink(twin("real_image_inversion"), size=64, steps=2))
    save = next(node for node, out in entry["outputs"].items() if out.get("images"))
    assert len(entry["outputs"][save]["images"]) == 2  # the photo and its reconstruction, side by side
