"""Loading a BLIP-Diffusion folder (released diffusers layout) into ComfyUI's own model types.

UNet, CLIP and VAE go through ComfyUI's loaders, so LoRA, patches and memory management
work as for any SD-1.5 model. Every file name comes from blip_core/layout.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..blip_core.config import SubjectEncoderConfig, unet_config
from ..blip_core.layout import CONFIG, QFORMER, TEXT_ENCODER, UNET, VAE
from ..blip_core.loading import read_state_dict
from . import compat

CLIP_OPTIONAL = {"text_projection.weight"}  # SD-1.5's CLIP has no projection; ComfyUI does not use it for SD-1.5


def read_config(path: Path, model: str) -> dict:
    """A config.json as a dict, or an error naming the model folder and the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{model}: missing {path.parent.name}/{path.name} (expected {path})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{model}: {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{model}: {path} holds a JSON {type(data).__name__}, expected an object of settings")
    return data


def read_configs(folder: Path) -> tuple[dict, SubjectEncoderConfig]:
    """The UNet's and the subject encoder's configs, checked before anything is loaded: a broken or hostile
    config.json is refused in a second, not after minutes of loading the other parts."""
    unet_file = UNET.config_file(folder)
    unet = unet_config(read_config(unet_file, folder.name), f"{folder.name}: {unet_file}")
    encoder_file = QFORMER.config_file(folder)
    return unet, SubjectEncoderConfig.from_dict(
        read_config(encoder_file, folder.name), f"{folder.name}: {encoder_file}"
    )


def diffusers_to_ldm(state_dict: dict, mapping: dict, source: Path, what: str = "an SD-1.5-style UNet") -> dict:
    unexpected = sorted(set(state_dict) - set(mapping))
    if unexpected:
        raise ValueError(f"{source} does not match its {CONFIG} (not {what}?): unexpected tensors {unexpected[:3]}")
    return {mapping[k]: v for k, v in state_dict.items()}


def load_unet(folder: Path, config: dict, dtype: torch.dtype | None):
    """The UNet of `folder`, described by its checked `config` (read_configs)."""
    path = UNET.weights_file(folder)
    ldm = diffusers_to_ldm(read_state_dict(path), compat.unet_key_mapping(config), path)
    model, kind = compat.load_unet(ldm, dtype)
    if model is None:
        raise ValueError(
            f"{path}: ComfyUI does not recognise this UNet as SD-1.5 (BLIP-Diffusion needs width 320 "
            "and a 768-wide cross-attention context)"
        )
    # ComfyUI happily loads e.g. an SD-2 UNet from these keys; the subject vectors are 768-wide CLIP-L tokens.
    if not kind.is_sd15 or kind.context_dim != 768:
        raise ValueError(
            f"{path}: ComfyUI reads this UNet as {kind.config_name} (cross-attention context "
            f"{kind.context_dim}); BLIP-Diffusion needs an SD-1.5 UNet (width 320, context 768) as in "
            "the release"
        )
    if kind.missing:
        raise ValueError(f"{path} lacks weights the UNet needs: {kind.missing[:3]} ({len(kind.missing)} in all)")
    return model


def load_clip(folder: Path):
    path = TEXT_ENCODER.weights_file(folder)
    state_dict = read_state_dict(path)
    try:
        clip, missing = compat.load_clip(state_dict)
    except RuntimeError as e:  # tensors of the right names but other shapes
        raise ValueError(f"{path} does not fit SD-1.5's CLIP-L text encoder: {e}") from None
    # ComfyUI only logs missing tensors and keeps uninitialised ones: refuse instead of encoding garbage.
    what = f"{path} is not SD-1.5's CLIP-L text encoder (the release's {TEXT_ENCODER.folder}/)"
    if missing is None:
        raise ValueError(f"{what}: ComfyUI reads it as {compat.clip_model_name(clip)}")
    missing = [k for k in missing if k not in CLIP_OPTIONAL]
    if missing:
        raise ValueError(f"{what}: missing {', '.join(missing[:3])} ({len(missing)} in all)")
    return clip


def load_vae(folder: Path):
    path = VAE.weights_file(folder)
    vae = compat.load_vae(read_state_dict(path))
    if vae is None:  # ComfyUI's own message blames a checkpoint loader node
        raise ValueError(
            f"{path} holds no VAE that ComfyUI recognises: expected the SD-1.5 VAE (AutoencoderKL) "
            f"as in the release's {VAE.folder}/"
        )
    return vae


def load_controlnet(path: Path):
    """A ComfyUI CONTROL_NET from a weights file: diffusers format (with or without a config.json
    next to it), or any single-file format ComfyUI's own loader reads."""
    state_dict = read_state_dict(path)
    diffusers = compat.is_diffusers_controlnet(state_dict)
    converted = diffusers and (path.parent / CONFIG).is_file()
    if converted:
        config = unet_config(read_config(path.parent / CONFIG, path.parent.parent.name), str(path.parent / CONFIG))
        mapping = compat.controlnet_key_mapping(config, state_dict)
        state_dict = diffusers_to_ldm(state_dict, mapping, path, "an SD-1.5-style ControlNet")
    elif diffusers and not compat.comfy_knows_diffusers_controlnet(state_dict):
        raise ValueError(
            f"{path}: a diffusers ControlNet of a shape ComfyUI does not know by itself; put its "
            f"{CONFIG} next to it (expected {path.parent / CONFIG})"
        )
    # ComfyUI's own loader turns on global average pooling for shuffle ControlNets by file name
    net = compat.load_controlnet(
        state_dict, global_average_pooling=path.stem.endswith(("_shuffle", "_shuffle_fp16")), ldm_keys=converted
    )
    if net is None:
        raise ValueError(f"{path} holds no ControlNet or T2I-Adapter weights that ComfyUI recognises")
    if converted:  # ComfyUI only warns about missing tensors; a converted release must be complete
        missing = compat.controlnet_missing(net, state_dict)
        if missing:
            raise ValueError(f"{path} lacks weights the ControlNet needs: {missing[:3]} ({len(missing)} in all)")
    return net
