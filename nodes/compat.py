"""Every ComfyUI internal the pack relies on, in one module, checked when the pack loads.

ComfyUI's only versioned API is its node API (nodes/api.py). Everything else the nodes need
(model loading and memory management, sampling, ControlNet and CLIP internals, model folders)
is reached through the functions here; no other module of nodes/ imports ComfyUI (ruff's
banned-api rule in pyproject.toml enforces it). `REQUIREMENTS` lists each internal symbol with
the nodes that need it; `disabled_nodes()` checks them once at load time, so a ComfyUI that
renamed or reshaped one loses only those nodes, with a log line that names the ComfyUI version,
the symbol and the nodes, while the rest of the pack keeps working.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import comfy.controlnet
import comfy.ldm.modules.attention as attention
import comfy.model_detection
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.utils
import folder_paths
import latent_preview
import torch
from comfy.cli_args import args

from ..blip_core.layout import WEIGHT_SUFFIXES
from ..blip_core.sampling import training_sigmas

try:
    from comfyui_version import __version__ as COMFYUI_VERSION
except ImportError:  # a ComfyUI older than the version file, or a vendored tree without it
    COMFYUI_VERSION = "(unknown version)"

LOADER = ("BlipDiffusionLoader",)
SAMPLERS = (
    "BlipDiffusionSampler",
    "BlipDiffusionPLMSSampler",
    "BlipDiffusionDDIMSampler",
    "BlipDiffusionDDIMInversion",
)
FUSE = ("BlipDiffusionMultimodalPromptFuse", "BlipDiffusionEditPrompt")
CONTROLNET_APPLY = ("BlipDiffusionControlNetApply",)
CONTROLNET_LOADER = ("BlipDiffusionControlNetLoader",)
EDIT = ("BlipDiffusionEditPrompt", "BlipDiffusionPromptToPrompt")  # an edit's CONDITIONING needs its MODEL
# What loading UNets and ControlNets with assigned (not copied) weights needs: _assigning_options.
ASSIGNING = (
    "comfy.model_detection:model_config_from_unet",
    "comfy.model_management:unet_dtype",
    "comfy.model_management:unet_manual_cast",
    "comfy.ops:pick_operations",
    "comfy.utils:calculate_parameters",
    "comfy.utils:weight_dtype",
)


# --- the checks ------------------------------------------------------------------------------------


def _has_methods(*names: str) -> Callable[[object], bool]:
    return lambda cls: all(callable(getattr(cls, n, None)) for n in names)


def _has_parameters(*names: str) -> Callable[[object], bool]:
    return lambda fn: set(names) <= set(inspect.signature(fn).parameters)


def _controlnet_fields(cls) -> bool:
    """The attributes the reference hint policy reads and writes on a ControlNet instance."""
    net = cls()  # no control model: nothing is built
    return all(
        hasattr(net, n)
        for n in (
            "cond_hint_original",
            "compression_ratio",
            "vae",
            "strength",
            "timestep_percent_range",
            "previous_controlnet",
        )
    )


def _token_layout(cls) -> bool:
    """ComfyUI's SD-1 tokens: {"l": [[(id, weight), ...] per 77-token chunk]}; the fuse splices tensors in."""
    tokens = cls().tokenize_with_weights("")
    chunk = tokens["l"][0]
    return len(chunk) == 77 and all(isinstance(t[0], int) and isinstance(t[1], float) for t in chunk)


def _attention_replace_convention(cls) -> bool:
    """A transformer block hands an attn1 / attn2 replace patch the projected q, k, v ([B, tokens, heads*d]) and
    extra options that hold the head count and the sampling's transformer options (cond_or_uncond, our state),
    and puts the patch's output through to_out: checked on a block of width 8 with one head."""
    block = cls(8, 1, 8, context_dim=8)
    seen = {}

    def patch(q, k, v, extra_options):
        seen.update(q=tuple(q.shape), k=tuple(k.shape), heads=extra_options["n_heads"], marker=extra_options["m"])
        return torch.zeros_like(q)

    options = {
        "block": ("input", 1),
        "block_index": 0,
        "m": "x",
        "patches_replace": {"attn1": {("input", 1, 0): patch}, "attn2": {("input", 1, 0): patch}},
    }
    with torch.no_grad():
        block(torch.zeros(1, 4, 8), context=torch.zeros(1, 3, 8), transformer_options=options)
    return seen == {"q": (1, 4, 8), "k": (1, 3, 8), "heads": 1, "marker": "x"}


@dataclass(frozen=True)
class Requirement:
    symbol: str  # "module:attribute.path"
    nodes: tuple[str, ...]  # the node ids that cannot work without it (none: an optimisation is skipped)
    check: Callable[[object], bool] | None = None  # the shape expected, beyond existing

    def problem(self) -> str | None:
        """Why the symbol is not usable, or None."""
        module, _, path = self.symbol.partition(":")
        try:
            obj = importlib.import_module(module)
            for name in path.split("."):
                obj = getattr(obj, name)
        except (ImportError, AttributeError) as e:
            return f"missing ({e})"
        if self.check is None:
            return None
        try:
            return None if self.check(obj) else "has another shape than expected"
        except Exception as e:  # whatever a reshaped internal raises when probed
            return f"has another shape than expected ({type(e).__name__}: {e})"


REQUIREMENTS = (
    Requirement(
        "folder_paths:add_model_folder_path",
        LOADER + CONTROLNET_LOADER,
        _has_parameters("folder_name", "full_folder_path"),
    ),
    Requirement("folder_paths:folder_names_and_paths", LOADER + CONTROLNET_LOADER),
    Requirement("comfy.sd:load_diffusion_model_state_dict", LOADER),
    Requirement("comfy.sd:load_text_encoder_state_dicts", LOADER, _has_parameters("state_dicts", "clip_type")),
    Requirement("comfy.sd:CLIPType.STABLE_DIFFUSION", LOADER),
    Requirement("comfy.sd:VAE", LOADER),
    Requirement("comfy.supported_models:SD15", LOADER),
    Requirement("comfy.utils:unet_to_diffusers", LOADER + CONTROLNET_LOADER),
    Requirement("comfy.controlnet:load_controlnet_state_dict", CONTROLNET_LOADER),
    Requirement("comfy.model_detection:unet_config_from_diffusers_unet", CONTROLNET_LOADER),
    Requirement(
        "comfy.controlnet:ControlNet",
        CONTROLNET_APPLY,
        lambda cls: (
            _has_methods("get_control", "copy", "cleanup", "set_cond_hint", "set_previous_controlnet")(cls)
            and _controlnet_fields(cls)
        ),
    ),
    Requirement("comfy.samplers:KSamplerX0Inpaint", SAMPLERS, _has_parameters("model", "sigmas")),
    Requirement("comfy.samplers:Sampler", SAMPLERS, _has_methods("sample")),
    Requirement("comfy.samplers:sampler_object", SAMPLERS),
    Requirement("comfy.samplers:KSampler.SAMPLERS", SAMPLERS),
    Requirement("comfy.sample:sample_custom", SAMPLERS),
    Requirement("comfy.model_sampling:EPS", SAMPLERS),
    Requirement("comfy.model_sampling:ModelSamplingDiscrete", SAMPLERS),
    Requirement("comfy.sd1_clip:SD1Tokenizer", FUSE, _token_layout),
    Requirement("comfy.sd1_clip:SDClipModel.process_tokens", FUSE),
    Requirement(
        "comfy.model_patcher:ModelPatcher",
        EDIT,
        _has_methods(
            "clone",
            "set_model_attn1_replace",
            "set_model_attn2_replace",
            "set_model_sampler_post_cfg_function",
            "add_wrapper_with_key",
        ),
    ),
    Requirement("comfy.ldm.modules.attention:BasicTransformerBlock", EDIT, _attention_replace_convention),
    Requirement("comfy.ldm.modules.attention:SpatialTransformer", EDIT),
    Requirement("comfy.ldm.modules.attention:optimized_attention", EDIT),
    Requirement("comfy.patcher_extension:WrappersMP.OUTER_SAMPLE", EDIT),
    Requirement("comfy.patcher_extension:WrappersMP.PREDICT_NOISE", EDIT),
    Requirement("comfy.samplers:CFGGuider.outer_sample", EDIT, _has_parameters("noise", "latent_image", "sigmas")),
    Requirement("comfy.samplers:CFGGuider.predict_noise", EDIT, _has_parameters("x", "timestep", "model_options")),
    Requirement("comfy.samplers:cfg_function", EDIT, _has_parameters("cond_pred", "uncond_pred", "model_options")),
    # Optimisations: without them the nodes work, a little slower (or, for ASSIGNING, with more memory).
    *(Requirement(symbol, ()) for symbol in ASSIGNING),
    Requirement("comfy.ldm.modules.attention:wrap_attn", ()),  # honours transformer_options' attention override
    Requirement("comfy.ldm.modules.attention:attention_pytorch", ()),
    Requirement("comfy.ldm.modules.attention:attention_sub_quad", ()),
)


@functools.cache
def problems() -> dict[str, str]:
    """Requirement symbol -> what is wrong with it, for every unusable one (checked once)."""
    return {r.symbol: p for r in REQUIREMENTS if (p := r.problem()) is not None}


def disabled_nodes() -> dict[str, list[str]]:
    """Node id -> the symbols it misses; logs what each missing symbol costs."""
    disabled: dict[str, list[str]] = {}
    for requirement in REQUIREMENTS:
        problem = problems().get(requirement.symbol)
        if problem is None:
            continue
        cost = (
            f"disabled nodes: {', '.join(requirement.nodes)}"
            if requirement.nodes
            else "an optimisation is skipped; every node works"
        )
        logging.warning(
            f"BLIP-Diffusion: ComfyUI {COMFYUI_VERSION}: {requirement.symbol} {problem}; {cost}. "
            "A BLIP-Diffusion update for this ComfyUI version restores them; the other nodes work."
        )
        for node in requirement.nodes:
            disabled.setdefault(node, []).append(requirement.symbol)
    return disabled


def available(symbol: str) -> bool:
    return symbol not in problems()


# --- model folders -------------------------------------------------------------------------------


def register_model_folder(kind: str) -> None:
    """models/<kind> first among the folders of `kind`, keeping extra paths from extra_model_paths.yaml."""
    folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, kind), is_default=True)


def folders(kind: str) -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(kind)]


def filenames(kind: str, suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> list[str]:
    """Files under the `kind` folders (subfolders included, as ComfyUI lists them) with one of `suffixes`."""
    return [name for name in folder_paths.get_filename_list(kind) if name.lower().endswith(suffixes)]


def input_directory() -> Path:
    return Path(folder_paths.get_input_directory())


def output_file(prefix: str, suffix: str) -> tuple[Path, str]:
    """The next numbered file for `prefix` in the output folder, named as ComfyUI's savers name theirs
    (`<prefix>_00001_<suffix>`), and its subfolder there."""
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory())
    return Path(folder) / f"{name}_{counter:05}_{suffix}", subfolder


# --- devices and progress --------------------------------------------------------------------------

ProgressBar = comfy.utils.ProgressBar
ModelPatcher = comfy.model_patcher.ModelPatcher
manual_cast = comfy.ops.manual_cast
load_models_gpu = mm.load_models_gpu
intermediate_device = mm.intermediate_device
torch_device = mm.get_torch_device


def text_encoder_devices() -> tuple[torch.device, torch.device]:
    """(load, offload) devices ComfyUI uses for text encoders; the subject encoder follows them."""
    return mm.text_encoder_device(), mm.text_encoder_offload_device()


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matrix work runs natively (about 2x float32), not emulated.
    torch only has private probes for it; without them the answer is no (float32 then)."""
    return any(
        getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def text_encoder_dtype(device: torch.device) -> torch.dtype | None:
    """ComfyUI's text-encoder precision when the user chose one by flag (or runs on a GPU), else None."""
    if args.force_fp32 or args.fp32_text_enc:
        return torch.float32
    if args.fp16_text_enc or args.bf16_text_enc or not mm.is_device_cpu(device):
        return mm.text_encoder_dtype(device)
    return None


# --- UNet, CLIP and VAE from the released layout ------------------------------------------------------


def ldm_unet_config(cfg: dict) -> dict:
    """ComfyUI's (LDM) UNet config for a diffusers UNet2DConditionModel config."""
    widths = list(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 2)
    layers = layers if isinstance(layers, list) else [layers] * len(widths)
    attn = [1 if "CrossAttn" in t else 0 for t in cfg["down_block_types"]]
    heads = cfg.get("attention_head_dim", 8)
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "model_channels": widths[0],
        "channel_mult": [w // widths[0] for w in widths],
        "num_res_blocks": layers,
        "transformer_depth": [a for a, n in zip(attn, layers) for _ in range(n)],
        "transformer_depth_output": [a for a, n in zip(attn, layers) for _ in range(n + 1)],
        "transformer_depth_middle": 1,
        "context_dim": cfg.get("cross_attention_dim", 768),
        "num_heads": heads if isinstance(heads, int) else heads[0],
        "use_linear_in_transformer": cfg.get("use_linear_projection", False),
    }


def unet_key_mapping(cfg: dict) -> dict[str, str]:
    """diffusers UNet key -> ComfyUI (LDM) key, for the UNet described by the diffusers config `cfg`."""
    return comfy.utils.unet_to_diffusers(ldm_unet_config(cfg))


def controlnet_key_mapping(cfg: dict, keys) -> dict[str, str]:
    """diffusers ControlNetModel key -> ComfyUI (LDM) ControlNet key, for any config.

    ComfyUI converts diffusers ControlNets only at the configs it knows; this is its mapping
    built from the model's own config.json instead.
    """
    mapping = unet_key_mapping(cfg)
    hint_blocks = 0
    for key in keys:
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


@dataclass(frozen=True)
class UNetKind:
    """What ComfyUI made of a UNet state dict."""

    config_name: str  # ComfyUI's model config class, e.g. SD15
    context_dim: int | None
    is_sd15: bool
    missing: list[str]  # UNet tensors the state dict did not provide


def _assigning(operations):
    """`operations` (a comfy.ops class) with layers that take each weight from the state dict as it is, cast only
    where its dtype or device differs, instead of copying it into memory allocated for it.

    ComfyUI builds a model with empty (never written, so never resident) weights and then copies the state dict
    into them: while it loads, every weight is in memory twice, the file's mapped pages and the copy. Assigned,
    the mapped tensors become the weights (as the subject encoder's and diffusers' loaders do), and the empty
    ones are freed untouched. ComfyUI's own mixed-precision layers assign the same way.
    """

    def assigning(layer: type) -> type:
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):
            for name, tensor in [*self._parameters.items(), *self._buffers.items()]:
                if tensor is not None and prefix + name in state_dict:
                    state_dict[prefix + name] = state_dict[prefix + name].to(device=tensor.device, dtype=tensor.dtype)
            metadata = {**local_metadata, "assign_to_params_buffers": True}
            layer._load_from_state_dict(self, state_dict, prefix, metadata, *args, **kwargs)

        return type(layer.__name__, (layer,), {"_load_from_state_dict": _load_from_state_dict})

    layers = {
        name: assigning(value)
        for name in dir(operations)
        if isinstance(value := getattr(operations, name), type) and issubclass(value, torch.nn.Module)
    }
    return type(f"Assigning_{operations.__name__}", (operations,), layers)


def _assigning_options(state_dict: dict, dtype: torch.dtype | None, controlnet: bool) -> dict:
    """model_options for ComfyUI's UNet and ControlNet loaders that assign the weights (see _assigning).

    The layers ComfyUI would pick depend on the weight dtype and its compute dtype: this makes the choice its
    loaders make (for an SD-1.5 state dict with LDM keys), with its own functions, and passes the dtype along so
    that they agree. Without these internals the loaders copy, as ComfyUI does by default.
    """
    options = {"dtype": dtype} if dtype else {}
    if not all(available(symbol) for symbol in ASSIGNING):
        return options
    config = comfy.model_detection.model_config_from_unet(state_dict, "", controlnet)
    if config is None:  # ComfyUI recognises nothing: its loader says so
        return options
    load_device = mm.get_torch_device()
    if dtype is None:
        dtype = mm.unet_dtype(
            model_params=-1 if controlnet else comfy.utils.calculate_parameters(state_dict),
            supported_dtypes=list(config.supported_inference_dtypes),
            weight_dtype=comfy.utils.weight_dtype(state_dict),
        )
    # as each loader asks: the ControlNet loader with the default dtypes
    supported = () if controlnet else (config.supported_inference_dtypes,)
    compute = mm.unet_manual_cast(dtype, load_device, *supported)
    return {"dtype": dtype, "custom_operations": _assigning(comfy.ops.pick_operations(dtype, compute))}


def load_unet(ldm_state_dict: dict, dtype: torch.dtype | None):
    """A MODEL from LDM-keyed UNet weights, and what ComfyUI recognised; (None, None) if it recognised nothing.
    The weights are assigned, not copied (memory-mapped ones stay mapped)."""
    model = comfy.sd.load_diffusion_model_state_dict(
        dict(ldm_state_dict), model_options=_assigning_options(ldm_state_dict, dtype, controlnet=False)
    )
    if model is None:
        return None, None
    config = model.model.model_config
    kind = UNetKind(
        type(config).__name__,
        config.unet_config.get("context_dim"),
        isinstance(config, comfy.supported_models.SD15),
        sorted(set(model.model.diffusion_model.state_dict()) - set(ldm_state_dict)),
    )
    return model, kind


def load_clip(state_dict: dict):
    """A CLIP (SD-1.5 type) and the tensors its CLIP-L lacks from `state_dict`; (clip, None) when ComfyUI
    made something else of it."""
    clip = comfy.sd.load_text_encoder_state_dicts(
        [dict(state_dict)],
        embedding_directory=folder_paths.get_folder_paths("embeddings"),
        clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
    )
    encoder = getattr(clip.cond_stage_model, "clip_l", None)
    if encoder is None:
        return clip, None
    return clip, sorted(set(encoder.transformer.state_dict()) - set(state_dict))


def clip_model_name(clip) -> str:
    return type(clip.cond_stage_model).__name__


def load_vae(state_dict: dict):
    """A VAE, or None when ComfyUI recognised no VAE in `state_dict`."""
    vae = comfy.sd.VAE(sd=state_dict)
    return None if vae.first_stage_model is None else vae


# --- ControlNet ------------------------------------------------------------------------------------


def is_diffusers_controlnet(state_dict: dict) -> bool:
    return "controlnet_cond_embedding.conv_in.weight" in state_dict


def comfy_knows_diffusers_controlnet(state_dict: dict) -> bool:
    return comfy.model_detection.unet_config_from_diffusers_unet(state_dict) is not None


def load_controlnet(state_dict: dict, global_average_pooling: bool, ldm_keys: bool):
    """A CONTROL_NET (or T2I-Adapter), or None when ComfyUI recognised neither. A ControlNet with LDM keys
    (`ldm_keys`: converted from diffusers by the pack) gets its weights assigned, not copied."""
    options = _assigning_options(state_dict, None, controlnet=True) if ldm_keys else {}
    if global_average_pooling:
        options["global_average_pooling"] = True
    return comfy.controlnet.load_controlnet_state_dict(dict(state_dict), model_options=options)


def controlnet_missing(net, state_dict: dict) -> list[str]:
    return sorted(set(net.control_model.state_dict()) - set(state_dict))


def controlnet_context_width(control_net) -> int | None:
    """The text-embedding width a ControlNet cross-attends to (768 for SD-1.5, 2048 for SDXL)."""
    model = getattr(control_net, "control_model", None)  # T2I-Adapters have none; Control-LoRAs build it later
    if model is None:
        return None
    for name, param in model.named_parameters():
        if name.endswith("attn2.to_k.weight"):
            return param.shape[1]
    return None


class _ReferenceHint:
    """Mixed into a copy of a ComfyUI ControlNet: resizes the hint at sampling time with `resize(image, h, w)`.

    `hint_source` is the control image as given ([B,3,H,W], 0..1). ComfyUI resizes
    `cond_hint_original` to latent x 8 (nearest-exact, center crop) before each run; this
    hands it an image already at that size, which ComfyUI's resize leaves unchanged.
    """

    hint_source: torch.Tensor
    hint_resize: Callable[[torch.Tensor, int, int], torch.Tensor]

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        latents, hints = x_noisy.shape[0] // batched_number, self.hint_source.shape[0]
        if hints not in (1, latents):
            raise ValueError(
                f"BlipDiffusionControlNetApply: image is a batch of {hints} control images but the "
                f"sampler has {latents} latents; give 1 control image (for all) or one per latent"
            )
        ratio = self.compression_ratio * (self.vae.spacial_compression_encode() if self.vae is not None else 1)
        height, width = x_noisy.shape[-2] * ratio, x_noisy.shape[-1] * ratio
        if tuple(self.cond_hint_original.shape[-2:]) != (height, width):
            self.cond_hint_original = self.hint_resize(self.hint_source, height, width)
        return super().get_control(x_noisy, t, cond, batched_number, transformer_options)

    def copy(self):
        c = super().copy()
        c.__class__, c.hint_source, c.hint_resize = type(self), self.hint_source, self.hint_resize
        return c

    def cleanup(self):
        self.cond_hint_original = self.hint_source  # the next run may have another output size
        super().cleanup()


@functools.cache
def _with_reference_hint(cls: type) -> type:
    return type(f"ReferenceHint{cls.__name__}", (_ReferenceHint, cls), {})


def attach_controlnet(
    control_net,
    hint: torch.Tensor,
    strength: float,
    window: tuple[float, float],
    vae,
    previous,
    resize: Callable[[torch.Tensor, int, int], torch.Tensor],
):
    """A copy of `control_net` with its hint (chained after `previous`), as ControlNetApplyAdvanced attaches one,
    except that a ControlNet's hint is resized by `resize(hint [B,3,H,W], height, width)` at sampling time.
    T2I-Adapters keep ComfyUI's own hint scaling."""
    net = control_net.copy().set_cond_hint(hint, strength, window, vae=vae)
    if isinstance(net, comfy.controlnet.ControlNet):
        net.__class__ = _with_reference_hint(type(net))
        net.hint_source, net.hint_resize = hint, resize
    return net.set_previous_controlnet(previous)


# --- CLIP tokens ------------------------------------------------------------------------------------


def clip_encoders(clip) -> list[str]:
    """The text encoders of a CLIP by their token keys (SD-1.5: ["l"])."""
    return sorted(clip.tokenize(""))


def clip_l_width(clip) -> int:
    return clip.tokenizer.clip_l.embedding_size


def clip_l_tokens(clip, text: str) -> list[list[tuple]]:
    """CLIP-L's (token, weight) chunks of `text`, 77 entries each (BOS, 75, EOS/padding)."""
    return clip.tokenize(text)["l"]


def encode_clip_l_tokens(clip, chunks: list[list[tuple]]) -> list:
    """CONDITIONING of CLIP-L token chunks; an entry may be a tensor, spliced in as a token embedding."""
    return clip.encode_from_tokens_scheduled({"l": chunks})


# --- sampling ----------------------------------------------------------------------------------------


def sampler_names() -> list[str]:
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    return list(comfy.samplers.KSampler.SCHEDULERS)


def scheduler_sigmas(model, sampler_name: str, scheduler: str, steps: int) -> torch.Tensor:
    return comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler).sigmas


def sampler(name: str):
    return comfy.samplers.sampler_object(name)


# The reference samplers' base class; if ComfyUI renamed it, those nodes are disabled (REQUIREMENTS) and
# this stand-in only keeps the pack importable.
Sampler = getattr(comfy.samplers, "Sampler", object)


def check_reference_schedule(model_wrap, sampler: str) -> None:
    """The reference samplers' maths holds for an epsilon-predicting model on SD-1.5's discrete schedule;
    v-prediction, flow or another noise schedule would give wrong pictures without an error.
    `model_wrap` is what ComfyUI hands a SAMPLER (its guider)."""
    sampling = model_wrap.inner_model.model_sampling
    kind = type(sampling).__name__
    if (
        not isinstance(sampling, comfy.model_sampling.EPS)
        or isinstance(sampling, comfy.model_sampling.V_PREDICTION)
        or not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)
        or isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteEDM)
    ):
        raise ValueError(
            f"{sampler}: model: needs an epsilon-prediction model on a discrete schedule (SD-1.5, as "
            f"BLIP-Diffusion) for the reference PLMS/DDIM maths; this model samples with {kind} "
            f"({_prediction(sampling)}). Remove the node that changed its sampling, or sample with one of "
            "ComfyUI's samplers"
        )
    expected = training_sigmas()
    if sampling.sigmas.shape != expected.shape or not torch.allclose(
        sampling.sigmas.float().cpu(), expected, rtol=1e-4
    ):
        raise ValueError(
            f"{sampler}: model: its noise schedule is not SD-1.5's (scaled linear betas 0.00085-0.012), "
            "which the reference PLMS/DDIM maths assumes; remove the node that changed it, or sample with one "
            "of ComfyUI's samplers"
        )


def _prediction(sampling) -> str:
    for cls, name in (
        (comfy.model_sampling.V_PREDICTION, "v-prediction"),
        (comfy.model_sampling.EPS, "epsilon"),
        (comfy.model_sampling.CONST, "flow / constant"),
    ):
        if isinstance(sampling, cls):
            return name
    return "another prediction type"


def reference_model_call(model_wrap, sigmas, latent_image, noise):
    """ComfyUI's denoiser with inpainting masks applied, as its own samplers call it: f(x, sigma, **extra_args)."""
    model = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
    model.latent_image, model.noise = latent_image, noise
    return model


def fix_empty_latent_channels(model, latent: torch.Tensor) -> torch.Tensor:
    return comfy.sample.fix_empty_latent_channels(model, latent)


def prepare_noise(latent: torch.Tensor, seed: int, batch_index) -> torch.Tensor:
    return comfy.sample.prepare_noise(latent, seed, batch_index)


def sample(model, noise, cfg, sampler, sigmas, positive, negative, latent, noise_mask, seed: int) -> torch.Tensor:
    """ComfyUI's sampling with CFG, ControlNet, previews, a progress bar and cancel."""
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    return comfy.sample.sample_custom(
        model,
        noise,
        cfg,
        sampler,
        sigmas,
        positive,
        negative,
        latent,
        noise_mask=noise_mask,
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )


def _pytorch_attention(func, *args, **kwargs):
    return attention.attention_pytorch(*args, **kwargs)


def prefer_pytorch_attention(model_options: dict, device: torch.device) -> None:
    """Use PyTorch's scaled-dot-product attention where ComfyUI fell back to its chunked sub-quadratic
    attention on the CPU (no attention flag given): there PyTorch's kernel is memory-efficient too,
    and a whole image is about 5 % faster (bench/run.py)."""
    if not all(
        available(f"comfy.ldm.modules.attention:{n}") for n in ("wrap_attn", "attention_pytorch", "attention_sub_quad")
    ):
        return
    fallback = attention.optimized_attention is attention.attention_sub_quad and not args.use_quad_cross_attention
    if fallback and mm.is_device_cpu(device):
        model_options.setdefault("transformer_options", {})["optimized_attention_override"] = _pytorch_attention


# --- attention control (subject-driven editing) -------------------------------------------------------

_COND = 0  # cond_or_uncond's entry for the positive half (sampling_function batches [positive, negative])
Layer = tuple[str, int, int]  # a transformer block: ("input" | "middle" | "output", block number, index)


def clone_model(model):
    """A copy of a MODEL (ModelPatcher) to patch, sharing the weights."""
    return model.clone()


def attention_layers(model) -> list[Layer]:
    """Every transformer block of a MODEL's UNet, as ComfyUI's attention replace patches address them."""
    unet = model.model.diffusion_model
    groups = (
        ("input", getattr(unet, "input_blocks", [])),
        ("middle", [getattr(unet, "middle_block", [])]),
        ("output", getattr(unet, "output_blocks", [])),
    )
    layers = []
    for name, blocks in groups:
        for number, block in enumerate(blocks):
            for module in block:
                if isinstance(module, attention.SpatialTransformer):
                    layers += [(name, number, i) for i in range(len(module.transformer_blocks))]
    return layers


@dataclass
class AttentionCall:
    """What an attention patch sees besides q, k, v: the head count, which chunk of the batch is the conditional
    half, the sampling run's state (None outside a run), the output the layer would have without this patch
    (an earlier replace patch's, or ComfyUI's optimized attention), and that attention for any q, k, v."""

    heads: int
    conditional: list[bool]
    state: object | None
    unpatched: Callable[[], torch.Tensor]
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def replace_attention(model, layer: Layer, is_cross: bool, handler, state_key: str) -> None:
    """Install `handler(q, k, v, call: AttentionCall) -> output` as the cross- (attn2) or self-attention (attn1)
    replace patch of one transformer block of `model` (a ModelPatcher, changed in place: clone it first).
    A replace patch already there (another pack's) keeps running wherever the handler returns the unpatched
    output."""
    kind = "attn2" if is_cross else "attn1"
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    previous = replaced.get(layer) or replaced.get(layer[:2])

    def patch(q, k, v, extra_options):
        def fused(q_, k_, v_):
            return attention.optimized_attention(
                q_,
                k_,
                v_,
                extra_options["n_heads"],
                attn_precision=extra_options.get("attn_precision"),
                transformer_options=extra_options,
            )

        call = AttentionCall(
            heads=extra_options["n_heads"],
            conditional=[c == _COND for c in extra_options.get("cond_or_uncond", [])],
            state=extra_options.get(state_key),
            unpatched=(lambda: previous(q, k, v, extra_options)) if previous else (lambda: fused(q, k, v)),
            attention=fused,
        )
        return handler(q, k, v, call)

    block, number, index = layer
    setter = model.set_model_attn2_replace if is_cross else model.set_model_attn1_replace
    setter(patch, block, number, index)


@dataclass
class SamplingStart:
    """What a sampling run starts from, as a wrapper sees it before ComfyUI's sampling: the noise and latent
    batches, the sigmas, and for each entry of the positive conditioning the value it holds under a key."""

    noise: torch.Tensor
    latent: torch.Tensor
    sigmas: torch.Tensor
    positive_marks: list


def wrap_sampling(model, key: str, state_key: str, begin) -> None:
    """Run `begin(SamplingStart) -> (state, noise, latent)` when each sampling run of `model` starts (ComfyUI's
    OUTER_SAMPLE wrapper, under `key`): the run samples the returned noise and latent, and its transformer
    options hold `state` under `state_key` for this run only (ComfyUI drops its copy of the options after the
    run, so nothing carries over to the next prompt). `key` also names the conditioning entries' mark."""

    def outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        marks = [entry.get(key) for entry in guider.conds.get("positive", [])]
        state, noise, latent_image = begin(SamplingStart(noise, latent_image, sigmas, marks))
        guider.model_options.setdefault("transformer_options", {})[state_key] = state
        if "latent_shapes" in kwargs:
            kwargs["latent_shapes"] = [latent_image.shape]
        return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, outer_sample)


def wrap_model_calls(model, key: str, state_key: str, after) -> None:
    """After every model evaluation of a sampling run (CFG applied), `after(state, denoised) -> denoised`, with the
    run's state (ComfyUI's PREDICT_NOISE wrapper, under `key`)."""

    def predict_noise(executor, x, timestep, model_options=None, seed=None):
        out = executor(x, timestep, model_options, seed)
        state = sampling_state(model_options or {}, state_key)
        return out if state is None else after(state, out)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, key, predict_noise)


def add_post_cfg(model, state_key: str, fn) -> None:
    """`fn(state, denoised, cond_denoised) -> denoised` after CFG (ComfyUI's sampler_post_cfg_function), with the
    sampling run's state; changes `model` in place."""

    def post_cfg(args):
        state = sampling_state(args["model_options"], state_key)
        return args["denoised"] if state is None else fn(state, args["denoised"], args["cond_denoised"])

    model.set_model_sampler_post_cfg_function(post_cfg)


def sampling_state(model_options: dict, state_key: str):
    """The state a wrap_sampling wrapper left for this run in the model options a sampler receives, or None."""
    return model_options.get("transformer_options", {}).get(state_key)


def model_state(model, key: str):
    """What set_model_state put on this MODEL (and its clones: LoRA loaders and other patches keep it), or None."""
    return model.model_options.get("transformer_options", {}).get(key)


def set_model_state(model, key: str, value) -> None:
    model.model_options.setdefault("transformer_options", {})[key] = value
