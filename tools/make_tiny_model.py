"""Write a seeded random BLIP-Diffusion model folder in the released diffusers layout.

    python tools/make_tiny_model.py OUT_DIR [--size tiny|edit|micro|full] [--format safetensors|bin|both]
                                            [--dtype fp16|fp32] [--controlnet] [--seed 0]

Layout: model_index.json, qformer/, text_encoder/, tokenizer/, unet/, vae/, scheduler/,
image_processor/ and, with --controlnet, controlnet/ (the -controlnet release). Key names,
configs and file names are those of Salesforce/blipdiffusion; the values are random.

Sizes:
  tiny   what ComfyUI still accepts as SD-1.5 (CLIP-L and the SD VAE at full size, a
         4-level UNet of width 320 with one block per level, a 1-layer Q-Former with
         a 768-wide output): ~0.3 B parameters, the CI / demo model.
  edit   `tiny` with two blocks per level, so that the attention layers sit where SD-1.5
         has them (prompt-to-prompt editing finds its 16x16 maps by layer position).
  micro  only the subject encoder and a narrow text encoder, for the committed parity
         fixtures (not loadable by ComfyUI).
  full   the released shapes (2.6 B parameters with ControlNet): for loader tests.

`make_hed_annotator` writes a random HED annotator (ControlNetHED.pth) for the preprocessor tests.

Every tensor is drawn from its own generator seeded by (seed, tensor name), so the same
seed and options give byte-identical files. The UNet/VAE/ControlNet key layouts come from
diffusers' model classes built on the meta device (no weights are initialised by them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch

from blip_diffusion_nodes.blip_core.config import QFormerConfig, SubjectEncoderConfig, VisionConfig
from blip_diffusion_nodes.blip_core.layout import CONTROLNET, MODEL_INDEX, QFORMER, TEXT_ENCODER, UNET, VAE
from blip_diffusion_nodes.blip_core.subject_encoder import SubjectEncoderModel
from blip_diffusion_nodes.tools.context_clip import CLIPTextTransformer, TextConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# --- component configurations -------------------------------------------------------------


def qformer_config(size: str) -> SubjectEncoderConfig:
    if size == "full":
        return SubjectEncoderConfig()
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    hidden = 32 if size == "micro" else 768
    qformer = QFormerConfig(
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=4 if size == "micro" else 12,
        intermediate_size=64 if size == "micro" else 256,
        encoder_hidden_size=64,
    )
    return SubjectEncoderConfig(vision=vision, qformer=qformer, num_query_tokens=16)


def text_config(size: str) -> TextConfig:
    if size == "micro":
        return TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return TextConfig()


def unet_config(size: str) -> dict:
    if size == "full":
        widths, layers = [320, 640, 1280, 1280], 2
    else:  # SD-1.5's topology at width 320: ComfyUI detects SD-1.5 by width 320 and context 768
        widths, layers = [320, 320, 320, 320], 2 if size == "edit" else 1
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "use_linear_projection": False,
    }


def controlnet_config(size: str) -> dict:
    unet = unet_config(size)
    keep = (
        "in_channels",
        "down_block_types",
        "block_out_channels",
        "layers_per_block",
        "cross_attention_dim",
        "attention_head_dim",
        "norm_num_groups",
        "act_fn",
        "flip_sin_to_cos",
        "freq_shift",
        "downsample_padding",
        "mid_block_scale_factor",
        "norm_eps",
        "use_linear_projection",
    )
    return {
        "_class_name": "ControlNetModel",
        **{k: unet[k] for k in keep},
        "conditioning_embedding_out_channels": [16, 32, 96, 256],
        "controlnet_conditioning_channel_order": "rgb",
    }


VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "trained_betas": None,
}

IMAGE_PROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "do_center_crop": True,
    "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD,
    "image_processor_type": "BlipImageProcessor",
    "processor_class": "BlipProcessor",
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"height": 224, "width": 224},
}


def model_index(controlnet: bool) -> dict:
    index = {
        "_class_name": "BlipDiffusionControlNetPipeline" if controlnet else "BlipDiffusionPipeline",
        "_diffusers_version": "0.18.0.dev0",
        "ctx_begin_pos": 2,
        "mean": CLIP_MEAN,
        "std": CLIP_STD,
        "image_processor": ["blip_diffusion", "BlipImageProcessor"],
        "qformer": ["blip_diffusion", "Blip2QFormerModel"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if controlnet:
        index["controlnet"] = ["diffusers", "ControlNetModel"]
    return index


def text_config_json(cfg: TextConfig) -> dict:
    return {
        "architectures": ["ContextCLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "projection_dim": cfg.hidden_size,
        **cfg.__dict__,
    }


# --- shapes and values ----------------------------------------------------------------------


def diffusers_shapes(config: dict) -> dict[str, tuple[torch.Size, torch.dtype]]:
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k != "scaling_factor"}
    with torch.device("meta"):
        model = cls(**kwargs)
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items()}


def module_shapes(module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in module.state_dict().items()}


def random_tensor(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """Values that keep a random network's activations O(1): unit-ish norms, small biases,
    weights with std 1/sqrt(fan_in)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    x = torch.randn(shape, generator=g)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1:
        is_norm_weight = leaf == "weight" and any(n in name.lower() for n in ("norm", "ln"))
        return 1.0 + 0.1 * x if is_norm_weight else 0.02 * x
    is_hint_encoder = "controlnet_cond_embedding" in name  # a conv stack, not a lookup table
    if ("embedding" in name and not is_hint_encoder) or leaf in ("query_tokens", "class_embedding"):
        return 0.5 * x
    fan_in = shape.numel() // shape[0]
    if name.endswith("controlnet_cond_embedding.conv_out.weight"):
        return 32 * x / fan_in**0.5  # so that the control image visibly steers the output, as in a trained ControlNet
    return x / fan_in**0.5


def state_dict(shapes: dict, seed: int, dtype: torch.dtype, component: str) -> dict[str, torch.Tensor]:
    """Random floating-point tensors; the component name is part of each seed (the UNet and ControlNet differ)."""
    return {
        name: random_tensor(f"{component}/{name}", shape, seed).to(dtype).contiguous()
        for name, (shape, tensor_dtype) in sorted(shapes.items())
        if tensor_dtype.is_floating_point
    }


def save_weights(tensors: dict, folder: Path, names: tuple[str, ...], fmt: str) -> None:
    """Under the part's safetensors name (names[0]), its pickle name (names[1]) or both (as some Hugging Face
    repositories carry both), as in blip_core.layout."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("safetensors", "both"):
        from safetensors.torch import save_file

        save_file(tensors, str(folder / names[0]))
    if fmt in ("bin", "both"):
        torch.save(tensors, folder / names[1])


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def weights_digest(model_dir: Path) -> str:
    """SHA-256 over the configs and weights of a model folder (fixtures record the one they used)."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".json"):
            h.update(path.relative_to(model_dir).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def clip_tokenizer_dir() -> Path:
    """ComfyUI ships the SD-1.5 CLIP tokenizer files (the same vocabulary as the released model)."""
    from blip_diffusion_nodes.tools.comfy_server import comfyui_dir

    candidate = comfyui_dir() / "comfy" / "sd1_tokenizer"
    if not (candidate / "vocab.json").is_file():
        raise FileNotFoundError(
            f"no CLIP tokenizer in {candidate}: pass --clip-tokenizer DIR (a folder with vocab.json and merges.txt)"
        )
    return candidate


# --- the folder -----------------------------------------------------------------------------


def make_model(
    out: Path,
    size: str = "tiny",
    fmt: str = "safetensors",
    dtype: str = "fp16",
    controlnet: bool = False,
    seed: int = 0,
    clip_tokenizer: Path | None = None,
) -> Path:
    """Write the folder; it appears under its name only once complete (callers cache on its existence)."""
    final = Path(out)
    out = final.with_name(final.name + ".partial")
    weight_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    for path in (out, final):
        if path.exists():
            shutil.rmtree(path)
    out.mkdir(parents=True)

    q_cfg = qformer_config(size)
    with torch.device("meta"):
        q_shapes = module_shapes(SubjectEncoderModel(q_cfg))
    q_weights = state_dict(q_shapes, seed, weight_dtype, "qformer")
    q_weights["embeddings.position_ids"] = torch.arange(q_cfg.qformer.max_position_embeddings)[None]
    write_json(QFORMER.config_file(out), q_cfg.to_dict())
    save_weights(q_weights, out / QFORMER.folder, QFORMER.weights, fmt)

    t_cfg = text_config(size)
    with torch.device("meta"):
        t_shapes = module_shapes(CLIPTextTransformer(t_cfg))
    write_json(TEXT_ENCODER.config_file(out), text_config_json(t_cfg))
    t_weights = {f"text_model.{k}": v for k, v in state_dict(t_shapes, seed, weight_dtype, "text_encoder").items()}
    t_weights["text_model.embeddings.position_ids"] = torch.arange(t_cfg.max_position_embeddings)[None]
    save_weights(t_weights, out / TEXT_ENCODER.folder, TEXT_ENCODER.weights, fmt)

    shutil.copytree(clip_tokenizer or clip_tokenizer_dir(), out / "tokenizer")
    write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(out / "image_processor" / "preprocessor_config.json", IMAGE_PROCESSOR_CONFIG)
    write_json(out / MODEL_INDEX, model_index(controlnet))
    if size == "micro":
        return out.rename(final)

    parts = [(UNET, unet_config(size)), (VAE, VAE_CONFIG)]
    if controlnet:
        parts.append((CONTROLNET, controlnet_config(size)))
    for part, config in parts:
        write_json(part.config_file(out), config)
        save_weights(
            state_dict(diffusers_shapes(config), seed, weight_dtype, part.folder), out / part.folder, part.weights, fmt
        )
    return out.rename(final)


def make_hed_annotator(out: Path, seed: int = 0) -> Path:
    """A seeded random `ControlNetHED.pth` in the real format: controlnet-aux's HED network, an fp16
    state dict written by torch.save. A few tensors are scaled so that the edge map of a photo is
    neither flat nor saturated and its scribble is not empty."""
    from controlnet_aux.hed import ControlNetHED_Apache2  # imports every controlnet-aux detector: slow

    with torch.device("meta"):
        shapes = module_shapes(ControlNetHED_Apache2())
    tensors = state_dict(shapes, seed, torch.float32, "hed")
    tensors["norm"] = torch.full_like(tensors["norm"], 127.5)  # the network sees 0..255 pixels
    tensors["block1.convs.0.weight"] /= 64
    for name in tensors:
        if name.endswith("projection.weight"):
            tensors[name] *= 30
        elif name.endswith("projection.bias"):
            tensors[name] = torch.ones_like(tensors[name])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in tensors.items()}, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--size", choices=["tiny", "edit", "micro", "full"], default="tiny")
    p.add_argument("--format", choices=["safetensors", "bin", "both"], default="safetensors")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--controlnet", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip-tokenizer", type=Path, default=None)
    a = p.parse_args()
    out = make_model(a.out, a.size, a.format, a.dtype, a.controlnet, a.seed, a.clip_tokenizer)
    print(out)


if __name__ == "__main__":
    main()
