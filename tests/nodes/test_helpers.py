"""The node helpers with ComfyUI's own modules, in-process: a helper bug fails here in a second, not over HTTP."""

from __future__ import annotations

import comfy.model_sampling
import comfy.sd1_clip
import pytest
import torch

from blip_diffusion_nodes.blip_core.prompt import MAX_LENGTH, NUM_QUERY_TOKENS
from blip_diffusion_nodes.blip_core.sampling import reference_sigmas
from blip_diffusion_nodes.nodes import available_nodes, compat, paths
from blip_diffusion_nodes.nodes.api import combo_error
from blip_diffusion_nodes.nodes.prompt import fused_tokens
from blip_diffusion_nodes.nodes.sampling import sampler_sigmas
from blip_diffusion_nodes.tools.make_tiny_model import controlnet_config, diffusers_shapes, unet_config


def test_this_comfyui_has_every_internal_the_pack_uses():
    assert compat.problems() == {}
    assert {n.define_schema().node_id for n in available_nodes()} >= {
        "BlipDiffusionSampler",
        "BlipDiffusionControlNetApply",
    }


def test_a_missing_internal_names_itself():
    requirement = compat.Requirement("comfy.samplers:NoSuchSampler", ("BlipDiffusionSampler",))
    assert requirement.problem().startswith("missing")
    reshaped = compat.Requirement("comfy.samplers:KSamplerX0Inpaint", (), compat._has_parameters("no_such_argument"))
    assert reshaped.problem() == "has another shape than expected"


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_unet_key_mapping_covers_every_diffusers_tensor(size):
    """Every tensor of a diffusers UNet2DConditionModel of that config gets its own ComfyUI (LDM) name."""
    config = unet_config(size)
    keys = [k for k, (_, dtype) in diffusers_shapes(config).items() if dtype.is_floating_point]
    mapping = compat.unet_key_mapping(config)
    assert not set(keys) - set(mapping)
    assert len({mapping[k] for k in keys}) == len(keys)


def test_controlnet_key_mapping_covers_every_diffusers_tensor():
    config = controlnet_config("tiny")
    keys = [k for k, (_, dtype) in diffusers_shapes(config).items() if dtype.is_floating_point]
    mapping = compat.controlnet_key_mapping(config, keys)
    assert not set(keys) - set(mapping)
    assert len({mapping[k] for k in keys}) == len(keys)
    assert mapping["controlnet_cond_embedding.conv_out.weight"] == "input_hint_block.14.weight"  # 6 blocks + in/out


@pytest.mark.parametrize(
    "name, escapes",
    [
        ("model", False),
        ("sub/model.safetensors", False),
        ("", True),
        (" ", True),
        ("../x", True),
        ("a/../../x", True),
        ("/etc", True),
    ],
)
def test_names_that_would_leave_their_folder(name, escapes):
    assert paths.escapes(name) is escapes
    assert (paths.prefix_error(name) is not None) is escapes


def test_combo_error_names_the_input_and_the_choices():
    assert combo_error("sampler_name", "plms", ["pndm", "euler"]) == (
        "sampler_name: 'plms' is not one of the choices (pndm, euler); pick one of them"
    )
    assert combo_error("sampler_name", "pndm", ["pndm"]) is None
    assert combo_error("sampler_name", None, ["pndm"]) is None  # a linked input


class TokenizingClip:
    """What fused_tokens asks of a CLIP (tokenize), answered by ComfyUI's real SD-1.5 tokenizer."""

    def __init__(self):
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer()

    def tokenize(self, text: str) -> dict:
        return self.tokenizer.tokenize_with_weights(text)


@pytest.fixture(scope="module")
def clip():
    return TokenizingClip()


def test_fused_tokens_splice_the_subject_after_a(clip):
    context = torch.randn(NUM_QUERY_TOKENS, 768)
    [chunk] = fused_tokens(clip, "a cat swimming underwater", context)
    text = clip.tokenize("a cat swimming underwater")["l"][0]
    assert len(chunk) == MAX_LENGTH
    assert chunk[:2] == text[:2]  # BOS, "a"
    assert all(torch.equal(chunk[2 + i][0], context[i]) for i in range(NUM_QUERY_TOKENS))
    assert chunk[2 + NUM_QUERY_TOKENS : 2 + NUM_QUERY_TOKENS + 4] == text[2:6]  # "cat swimming underwater", EOS


def test_fused_tokens_keep_59_text_tokens_of_a_long_prompt(clip):
    [chunk] = fused_tokens(clip, " ".join(["red"] * 300), torch.zeros(NUM_QUERY_TOKENS, 768))
    bos, red, eos = clip.tokenize("red")["l"][0][:3]
    ids = [t for t in chunk if not isinstance(t[0], torch.Tensor)]
    assert ids == [bos] + [red] * 59 + [eos]


def model_sampling(*kinds, **settings):
    """A model_sampling object as ComfyUI builds them: a discrete schedule mixed with a prediction type."""
    return type("ModelSampling", kinds, {})(None, **settings)


class Guider:  # what ComfyUI hands a SAMPLER: its guider, whose inner model holds model_sampling
    def __init__(self, sampling):
        self.inner_model = type("Model", (), {"model_sampling": sampling})()


def test_reference_samplers_accept_sd15_epsilon():
    compat.check_reference_schedule(
        Guider(model_sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS)), "pndm"
    )


@pytest.mark.parametrize(
    "kinds, expected",
    [
        ((comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION), "v-prediction"),
        ((comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST), "flow"),
    ],
)
def test_reference_samplers_refuse_other_predictions(kinds, expected):
    with pytest.raises(ValueError, match=f"epsilon-prediction model.*{expected}"):
        compat.check_reference_schedule(Guider(model_sampling(*kinds)), "pndm")


def test_reference_samplers_refuse_another_noise_schedule():
    """ComfyUI's ModelSamplingDiscrete node with zsnr (zero terminal SNR) rescales the schedule."""
    sampling = model_sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS, zsnr=True)
    with pytest.raises(ValueError, match="noise schedule is not SD-1.5's"):
        compat.check_reference_schedule(Guider(sampling), "pndm")


def test_reference_sigmas_and_img2img_tail():
    assert torch.equal(sampler_sigmas(None, "pndm", "reference", 25, 1.0), reference_sigmas(25))
    tail = sampler_sigmas(None, "pndm", "reference", 10, 0.5)
    assert torch.equal(tail, reference_sigmas(20)[-11:])
