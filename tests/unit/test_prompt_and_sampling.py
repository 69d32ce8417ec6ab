"""Prompt template, token layout and the reference schedule (the parity tests cover the numbers)."""

from __future__ import annotations

import torch

from blip_diffusion_nodes.blip_core.prompt import build_prompt, splice_context
from blip_diffusion_nodes.blip_core.sampling import reference_sigmas, reference_timesteps, sample_plms


def test_build_prompt_repeats_and_floors():
    assert build_prompt("  swimming ", "dog", 1.0, 3) == "a dog swimming, a dog swimming, a dog swimming"
    assert build_prompt("x", "dog", 0.5, 5) == "a dog x, a dog x"  # floor(2.5)
    assert build_prompt("x", "dog", 0.0, 20) == ""


def test_splice_layout():
    layout = splice_context(["a", "dog"], ["c"] * 16, "<s>", "</s>", "<p>")
    assert layout[:2] == ["<s>", "a"] and layout[2:18] == ["c"] * 16
    assert layout[18:20] == ["dog", "</s>"] and layout[20:] == ["<p>"] * 57 and len(layout) == 77


def test_splice_truncates_to_59_text_tokens():
    layout = splice_context(list(range(100)), ["c"] * 16, "<s>", "</s>", "<p>")
    assert len(layout) == 77 and layout[-1] == "</s>" and layout[-2] == 58


def test_empty_text_puts_the_context_after_eos():
    """strength 0: the reference's quirk [BOS, EOS, ctx..., pad...] is kept."""
    assert splice_context([], ["c"] * 16, "<s>", "</s>", "<p>")[:3] == ["<s>", "</s>", "c"]


def test_reference_timesteps():
    assert reference_timesteps(25)[:3] == [960, 920, 880] and reference_timesteps(25)[-1] == 0
    sigmas = reference_sigmas(25)
    assert len(sigmas) == 26 and sigmas[-1] == sigmas[-2]  # the last reference step is a no-op


def test_plms_skips_the_no_op_step_and_never_divides_by_zero():
    calls = []

    def eps(x, sigma):
        calls.append(float(sigma))
        return torch.ones_like(x)

    out = sample_plms(eps, torch.zeros(1), torch.tensor([2.0, 1.0, 1.0]))
    assert len(calls) == 2 and torch.allclose(out, torch.tensor([-1.0]))  # Heun start: 2 calls
    calls.clear()
    sample_plms(eps, torch.zeros(1), torch.tensor([2.0, 0.0]))
    assert calls == [2.0]  # no correction at sigma 0
