"""The UNet and ControlNet loaders hand ComfyUI's layers the state dict's own tensors (memory-mapped from the file)
instead of copying them into memory allocated for the model: no second copy of the weights while a model loads."""

from __future__ import annotations

import pytest
import torch

from blip_diffusion_nodes.nodes import compat
from blip_diffusion_nodes.tools.make_tiny_model import controlnet_config, diffusers_shapes, unet_config


def random_state_dict(config: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        key: torch.randn(shape, generator=generator).to(dtype)
        for key, (shape, kind) in diffusers_shapes(config).items()
        if kind.is_floating_point
    }


def shared(module: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """How many of `module`'s parameters are tensors of `state_dict` (same memory), of how many."""
    pointers = {t.data_ptr() for t in state_dict.values()}
    params = list(module.parameters())
    return sum(p.data_ptr() in pointers for p in params), len(params)


@pytest.mark.parametrize("internals", [True, False], ids=["assigned", "copied-without-the-internals"])
def test_unet_weights_are_the_state_dict_tensors(monkeypatch, internals):
    if not internals:  # a ComfyUI without what _assigning_options needs: its loader copies, as by default
        available = compat.available
        monkeypatch.setattr(compat, "available", lambda symbol: symbol not in compat.ASSIGNING and available(symbol))
    config = unet_config("tiny")
    mapping = compat.unet_key_mapping(config)
    ldm = {mapping[k]: v for k, v in random_state_dict(config, torch.float32).items()}
    model, kind = compat.load_unet(ldm, None)  # on the CPU ComfyUI computes in float32: nothing to cast
    assert kind.is_sd15 and not kind.missing
    same, total = shared(model.model.diffusion_model, ldm)
    assert total == len(ldm) and same == (total if internals else 0)


def test_unet_weights_of_another_dtype_are_cast_once():
    config = unet_config("tiny")
    mapping = compat.unet_key_mapping(config)
    ldm = {mapping[k]: v for k, v in random_state_dict(config, torch.float32).items()}
    model, _ = compat.load_unet(ldm, torch.float16)
    unet = model.model.diffusion_model
    assert shared(unet, ldm)[0] == 0
    key = "input_blocks.0.0.weight"
    assert unet.get_parameter(key).dtype == torch.float16
    torch.testing.assert_close(unet.get_parameter(key), ldm[key].half())


def test_controlnet_weights_are_the_state_dict_tensors():
    config = controlnet_config("tiny")
    state_dict = random_state_dict(config, torch.float32)
    mapping = compat.controlnet_key_mapping(config, state_dict)
    ldm = {mapping[k]: v for k, v in state_dict.items()}
    net = compat.load_controlnet(ldm, global_average_pooling=False, ldm_keys=True)
    same, total = shared(net.control_model, ldm)
    assert same == total == len(ldm)
