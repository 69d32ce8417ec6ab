"""Loading a BLIP-Diffusion folder (released diffusers layout) into ComfyUI's own model types.

UNet, CLIP and VAE go through ComfyUI's loaders, so LoRA, patches and memory management
work as for any SD-1.5 model. The subject encoder is a plain module in a ModelPatcher.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.controlnet
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths
from comfy.cli_args import args

from ..blip_core import SubjectEncoder, load_subject_encoder, read_state_dict
from ..blip_core.subject_encoder import WEIGHT_NAMES as QFORMER_FILES

UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
              "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
TEXT_FILES = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin")
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What the loader reads from a folder: (subfolder, weight file names in order of preference, needs config.json).
# tokenizer/ is not read: ComfyUI's SD-1.5 CLIP tokenizer is the release's vocabulary.
LAYOUT = (("qformer", QFORMER_FILES, True), ("text_encoder", TEXT_FILES, False), ("unet", UNET_FILES, True),
          ("vae", UNET_FILES, False))
CLIP_OPTIONAL = {"text_projection.weight"}  # SD-1.5's CLIP has no projection; ComfyUI does not use it for SD-1.5


def component(folder: Path, sub: str, names: tuple[str, ...]) -> Path:
    """`folder/sub/<one of names>`, or an error naming the folder and the files expected there."""
    for name in names:
        if (folder / sub / name).is_file():
            return folder / sub / name
    raise FileNotFoundError(f"{folder.name}: missing {sub}/ weights: expected {folder / sub}/{names[0]} "
                            f"(or {', '.join(names[1:])}); the folder needs the released BLIP-Diffusion layout")


def check_layout(folder: Path) -> None:
    """Every file the loader reads, checked before any is loaded: one error lists all that are missing,
    instead of failing on the last part after minutes of loading the others."""
    missing = []
    for sub, names, needs_config in LAYOUT:
        if needs_config and not (folder / sub / "config.json").is_file():
            missing.append(f"{sub}/config.json")
        if not any((folder / sub / name).is_file() for name in names):
            missing.append(f"{sub}/{names[0]} (or {', '.join(names[1:])})")
    if missing:
        raise FileNotFoundError(f"{folder.name}: incomplete BLIP-Diffusion folder {folder}: missing "
                                f"{'; '.join(missing)}. It needs the released layout (model_index.json, qformer/, "
                                "text_encoder/, unet/, vae/), e.g. a full download of Salesforce/blipdiffusion.")


def read_config(folder: Path, sub: str, file: str = "config.json") -> dict:
    path = folder / sub / file
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder.name}: missing {sub}/{file} (expected {path})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder.name}: {path} is not valid JSON: {e}") from None


def ldm_unet_config(cfg: dict) -> dict:
    """ComfyUI's (LDM) UNet config for a diffusers UNet2DConditionModel config."""
    widths = list(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 2)
    layers = layers if isinstance(layers, list) else [layers] * len(widths)
    attn = [1 if "CrossAttn" in t else 0 for t in cfg["down_block_types"]]
    heads = cfg.get("attention_head_dim", 8)
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
        "in_channels": cfg.get("in_channels", 4), "out_channels": cfg.get("out_channels", 4),
        "model_channels": widths[0], "channel_mult": [w // widths[0] for w in widths], "num_res_blocks": layers,
        "transformer_depth": [a for a, n in zip(attn, layers) for _ in range(n)],
        "transformer_depth_output": [a for a, n in zip(attn, layers) for _ in range(n + 1)],
        "transformer_depth_middle": 1, "context_dim": cfg.get("cross_attention_dim", 768),
        "num_heads": heads if isinstance(heads, int) else heads[0],
        "use_linear_in_transformer": cfg.get("use_linear_projection", False),
    }


def controlnet_mapping(cfg: dict, state_dict: dict) -> dict:
    """diffusers ControlNetModel keys -> ComfyUI's (LDM) ControlNet keys, for any config.

    comfy.controlnet converts diffusers ControlNets only at the configs it knows; this is
    its mapping built from the model's own config.json instead.
    """
    mapping = comfy.utils.unet_to_diffusers(ldm_unet_config(cfg))
    hint_blocks = 0
    for key in state_dict:
        parts = key.split(".")
        if parts[0] == "controlnet_down_blocks":  # the zero convolutions, one per down-block output
            mapping[key] = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif parts[:2] == ["controlnet_cond_embedding", "blocks"]:
            mapping[key] = f"input_hint_block.{2 * (int(parts[2]) + 1)}.{parts[3]}"
            hint_blocks = max(hint_blocks, int(parts[2]) + 1)
    for param in ("weight", "bias"):  # the hint encoder's convolutions sit at even indices (SiLU between)
        mapping[f"controlnet_cond_embedding.conv_in.{param}"] = f"input_hint_block.0.{param}"
        mapping[f"controlnet_cond_embedding.conv_out.{param}"] = f"input_hint_block.{2 * (hint_blocks + 1)}.{param}"
        mapping[f"controlnet_mid_block.{param}"] = f"middle_block_out.0.{param}"
    return mapping


def diffusers_to_ldm(state_dict: dict, mapping: dict, source: Path, what: str = "an SD-1.5-style UNet") -> dict:
    unexpected = sorted(set(state_dict) - set(mapping))
    if unexpected:
        raise ValueError(f"{source} does not match its config.json (not {what}?): unexpected tensors {unexpected[:3]}")
    return {mapping[k]: v for k, v in state_dict.items()}


def load_unet(folder: Path, dtype: torch.dtype | None):
    path = component(folder, "unet", UNET_FILES)
    ldm = diffusers_to_ldm(read_state_dict(path),
                           comfy.utils.unet_to_diffusers(ldm_unet_config(read_config(folder, "unet"))), path)
    model = comfy.sd.load_diffusion_model_state_dict(dict(ldm), model_options={"dtype": dtype} if dtype else {})
    if model is None:
        raise ValueError(f"{path}: ComfyUI does not recognise this UNet as SD-1.5 (BLIP-Diffusion needs width 320 "
                         "and a 768-wide cross-attention context)")
    # ComfyUI happily loads e.g. an SD-2 UNet from these keys; the subject vectors are 768-wide CLIP-L tokens.
    config = model.model.model_config
    context = config.unet_config.get("context_dim")
    if not isinstance(config, comfy.supported_models.SD15) or context != 768:
        raise ValueError(f"{path}: ComfyUI reads this UNet as {type(config).__name__} (cross-attention context "
                         f"{context}); BLIP-Diffusion needs an SD-1.5 UNet (width 320, context 768) as in the release")
    missing = sorted(set(model.model.diffusion_model.state_dict()) - set(ldm))
    if missing:
        raise ValueError(f"{path} lacks weights the UNet needs: {missing[:3]} ({len(missing)} in all)")
    return model


def load_clip(folder: Path):
    path = component(folder, "text_encoder", TEXT_FILES)
    state_dict = read_state_dict(path)
    try:
        clip = comfy.sd.load_text_encoder_state_dicts([dict(state_dict)],
                                                      embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                      clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    except RuntimeError as e:  # tensors of the right names but other shapes
        raise ValueError(f"{path} does not fit SD-1.5's CLIP-L text encoder: {e}") from None
    # ComfyUI only logs missing tensors and keeps uninitialised ones: refuse instead of encoding garbage.
    what = f"{path} is not SD-1.5's CLIP-L text encoder (the release's text_encoder/)"
    encoder = getattr(clip.cond_stage_model, "clip_l", None)
    if encoder is None:
        raise ValueError(f"{what}: ComfyUI reads it as {type(clip.cond_stage_model).__name__}")
    missing = sorted(set(encoder.transformer.state_dict()) - set(state_dict) - CLIP_OPTIONAL)
    if missing:
        raise ValueError(f"{what}: missing {', '.join(missing[:3])} ({len(missing)} in all)")
    return clip


def load_vae(folder: Path):
    path = component(folder, "vae", UNET_FILES)
    vae = comfy.sd.VAE(sd=read_state_dict(path))
    if vae.first_stage_model is None:  # ComfyUI's own message blames a checkpoint loader node
        raise ValueError(f"{path} holds no VAE that ComfyUI recognises: expected the SD-1.5 VAE (AutoencoderKL) "
                         "as in the release's vae/")
    return vae


DIFFUSERS_CONTROLNET_KEY = "controlnet_cond_embedding.conv_in.weight"


def load_controlnet(path: Path):
    """A ComfyUI CONTROL_NET from a weights file: diffusers format (with or without a config.json
    next to it), or any single-file format ComfyUI's own loader reads."""
    state_dict = read_state_dict(path)
    converted = DIFFUSERS_CONTROLNET_KEY in state_dict and (path.parent / "config.json").is_file()
    if converted:
        cfg = read_config(path.parent.parent, path.parent.name)
        state_dict = diffusers_to_ldm(state_dict, controlnet_mapping(cfg, state_dict), path, "an SD-1.5-style ControlNet")
    elif DIFFUSERS_CONTROLNET_KEY in state_dict and comfy.model_detection.unet_config_from_diffusers_unet(state_dict) is None:
        raise ValueError(f"{path}: a diffusers ControlNet of a shape ComfyUI does not know by itself; put its "
                         f"config.json next to it (expected {path.parent / 'config.json'})")
    # ComfyUI's own loader turns on global average pooling for shuffle ControlNets by file name
    options = {"global_average_pooling": True} if path.stem.endswith(("_shuffle", "_shuffle_fp16")) else {}
    net = comfy.controlnet.load_controlnet_state_dict(dict(state_dict), model_options=options)
    if net is None:
        raise ValueError(f"{path} holds no ControlNet or T2I-Adapter weights that ComfyUI recognises")
    if converted:  # ComfyUI only warns about missing tensors; a converted release must be complete
        missing = sorted(set(net.control_model.state_dict()) - set(state_dict))
        if missing:
            raise ValueError(f"{path} lacks weights the ControlNet needs: {missing[:3]} ({len(missing)} in all)")
    return net


@dataclass
class LoadedSubjectEncoder:
    """The BLIPD_SUBJECT_ENCODER payload: the core encoder and the patcher that places it."""

    encoder: SubjectEncoder
    patcher: comfy.model_patcher.ModelPatcher
    compute_dtype: torch.dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, categories, preprocess: str, mask=None) -> torch.Tensor:
        mm.load_models_gpu([self.patcher])
        out = self.encoder.encode(images, categories, preprocess, mask, device=self.patcher.load_device,
                                  dtype=self.compute_dtype)
        return out.to(mm.intermediate_device())


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matrix work runs natively (about 2x float32), not emulated."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def encoder_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The subject encoder's precision. auto: ComfyUI's text-encoder precision flags when given
    (--fp32-text-enc, --force-fp32, ...); on a GPU its text-encoder dtype; on a CPU bfloat16 where
    the CPU computes it natively, else float32 (LayerNorms always run in float32)."""
    if DTYPES[choice] is not None:
        return DTYPES[choice]
    if args.force_fp32 or args.fp32_text_enc:
        return torch.float32
    if args.fp16_text_enc or args.bf16_text_enc or not mm.is_device_cpu(device):
        return mm.text_encoder_dtype(device)
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def load_subject_encoder_patcher(path: Path, dtype_choice: str) -> LoadedSubjectEncoder:
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = encoder_dtype(dtype_choice, load_device)
    pbar = comfy.utils.ProgressBar(100)

    def progress(done: int, total: int) -> None:
        percent = done * 100 // total
        if percent != pbar.current:
            pbar.update_absolute(percent)

    encoder = load_subject_encoder(path, device=offload_device, dtype=dtype, operations=comfy.ops.manual_cast,
                                   progress=progress)
    patcher = comfy.model_patcher.ModelPatcher(encoder.model, load_device=load_device, offload_device=offload_device)
    logging.info("BLIP-Diffusion: subject encoder %s loaded (%s)", path.name, dtype)
    return LoadedSubjectEncoder(encoder, patcher, dtype)
