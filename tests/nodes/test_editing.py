"""The editing nodes' helpers with ComfyUI's own modules, in-process: the Edit Prompt's token ids from ComfyUI's
tokenizer give the original's mapper, and the attention replace patch sees what a ComfyUI transformer block
hands it (q, k, v, heads, the conditional chunk, the run's state) and leaves the block as it was where it
edits nothing."""

from __future__ import annotations

import json
from pathlib import Path

import comfy.ldm.modules.attention as attention
import comfy.model_patcher
import numpy as np
import pytest
import torch

from blip_diffusion_nodes.blip_core.editing import edit_prompts, edit_spec
from blip_diffusion_nodes.nodes import compat
from blip_diffusion_nodes.nodes.prompt import token_ids
from blip_diffusion_nodes.tests.nodes.test_helpers import TokenizingClip

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "editing_lavis.npz"
PAIRS = ["cat_dog", "multi_token", "same_word", "multi_word", "long"]


@pytest.fixture(scope="module")
def fx():
    return np.load(FIXTURE)


@pytest.fixture(scope="module")
def clip():
    return TokenizingClip()


@pytest.mark.parametrize("name", PAIRS)
def test_comfy_tokens_give_the_originals_mapper(fx, clip, name):
    """LAVIS tokenizes with transformers' CLIPTokenizer; ComfyUI's tokenizer gives the same ids, so the Edit
    Prompt's mapper is the original's."""
    pair = next(p for p in json.loads(fx["meta"].tobytes())["level1"]["pairs"] if p["name"] == name)
    source, target = edit_prompts(pair["source_subject"], pair["target_subject"], pair["prompt"], "lavis")
    assert (source, target) == (pair["source_prompt"], pair["target_prompt"])
    ids = {key: fx[f"l1/pair/{name}/{key}"].tolist() for key in ("source_ids", "target_ids", "source_word_ids")}
    assert token_ids(clip, source) == ids["source_ids"]
    assert token_ids(clip, target) == ids["target_ids"]
    assert token_ids(clip, pair["source_subject"])[1:-1] == ids["source_word_ids"]
    spec = edit_spec(
        ids["source_ids"], ids["target_ids"], ids["source_word_ids"], "lavis", source, target, pair["source_subject"]
    )
    assert spec.mapper.tolist() == fx[f"l1/pair/{name}/mapper"].tolist()
    assert torch.equal(spec.alphas, torch.from_numpy(fx[f"l1/pair/{name}/alphas"]))


def patcher() -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(torch.nn.Linear(1, 1), torch.device("cpu"), torch.device("cpu"))


def block_output(block, x, context, options):
    with torch.no_grad():
        return block(x, context=context, transformer_options=dict(options))


@pytest.fixture(scope="module")
def block():
    block = attention.BasicTransformerBlock(32, 2, 16, context_dim=24).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's layers leave their weights uninitialised
        for param in block.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=g))
    return block


def test_the_patch_sees_the_layer_and_leaves_it_as_it_was(block):
    """Installed on ("input", 7, 0), a handler that returns the unpatched output reproduces the block exactly,
    and receives the projected q, k, v, the heads, which chunk is conditional and the run's state."""
    model, seen = patcher(), []

    def handler(q, k, v, call):
        seen.append((q.shape, k.shape, call.heads, call.conditional, call.state))
        return call.unpatched()

    for is_cross in (False, True):
        compat.replace_attention(model, ("input", 7, 0), is_cross, handler, "state_key")
    x, context = torch.randn(4, 16, 32), torch.randn(4, 77, 24)
    options = {"block": ("input", 7), "block_index": 0, "cond_or_uncond": [1, 0], "state_key": "run"}
    plain = block_output(block, x, context, {})
    patched = block_output(block, x, context, {**options, **model.model_options["transformer_options"]})
    assert torch.allclose(patched, plain, atol=1e-6)
    assert seen == [
        (torch.Size([4, 16, 32]), torch.Size([4, 16, 32]), 2, [False, True], "run"),
        (torch.Size([4, 16, 32]), torch.Size([4, 77, 32]), 2, [False, True], "run"),
    ]


def test_an_earlier_replace_patch_keeps_running(block):
    """Another pack's attn2 replace patch on the same block runs wherever the edit changes nothing."""
    model, calls = patcher(), []

    def earlier(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return torch.zeros_like(q)

    model.set_model_attn2_replace(earlier, "input", 7, 0)
    compat.replace_attention(model, ("input", 7, 0), True, lambda q, k, v, call: call.unpatched(), "state_key")
    options = {"block": ("input", 7), "block_index": 0, "cond_or_uncond": [0]}
    block_output(
        block, torch.randn(2, 16, 32), torch.randn(2, 77, 24), {**options, **model.model_options["transformer_options"]}
    )
    assert calls == [("input", 7)]


def test_state_on_a_model_survives_its_clones():
    model = patcher()
    compat.set_model_state(model, "k", "edit")
    assert compat.model_state(model.clone(), "k") == "edit" and compat.model_state(patcher(), "k") is None
