"""Loader nodes: a whole BLIP-Diffusion folder, or only its subject encoder."""

from __future__ import annotations

from ..blip_core.layout import BLIP_DIFFUSION, CONFIG, MODEL_INDEX, QFORMER, WEIGHT_SUFFIXES, check_model_folder
from . import paths
from .api import CATEGORY, SubjectEncoderType, combo_error, io
from .models import load_clip, load_unet, load_vae, read_configs
from .subject import DTYPES, load_encoder

WHERE = (
    "Folders in models/blip_diffusion with the released diffusers layout (model_index.json, qformer/, "
    f"text_encoder/, tokenizer/, unet/, vae/), e.g. {BLIP_DIFFUSION.location}: {BLIP_DIFFUSION.page}"
)
DTYPE_TIP = (
    "Weight precision. auto: ComfyUI's precision flags if given; otherwise the UNet, CLIP and VAE as "
    "ComfyUI chooses, and the subject encoder in half precision on a GPU, in bfloat16 on a CPU that "
    "computes it natively (AVX512-BF16/AMX), else float32."
)


def is_model_folder(path) -> bool:
    return (path / MODEL_INDEX).is_file()


def is_encoder_entry(path) -> bool:
    return (path / QFORMER.folder / CONFIG).is_file() or paths.is_weights_file(path)


class BlipDiffusionLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionLoader",
            display_name="BLIP-Diffusion Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads a BLIP-Diffusion model: its SD-1.5 UNet, CLIP and VAE through ComfyUI's loaders, "
            "and the BLIP-2 subject encoder.",
            inputs=[
                io.Combo.Input("model_name", options=paths.model_folders(), tooltip=WHERE),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="auto", tooltip=DTYPE_TIP),
            ],
            outputs=[
                io.Model.Output(tooltip="BLIP-Diffusion's UNet (SD-1.5 architecture)."),
                io.Clip.Output(
                    tooltip="BLIP-Diffusion's CLIP text encoder; use it for the prompt fuse and the negative prompt."
                ),
                io.Vae.Output(tooltip="The SD-1.5 VAE."),
                SubjectEncoderType.Output(
                    display_name="subject_encoder", tooltip="The BLIP-2 Q-Former subject encoder."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None = None, weight_dtype: str | None = None):
        expected = (
            "has no model_index.json: a model folder has the released diffusers layout (model_index.json, "
            "qformer/, text_encoder/, tokenizer/, unet/, vae/)"
        )
        return (
            paths.entry_error(
                "model_name",
                model_name,
                paths.MODELS,
                "BLIP-Diffusion model",
                is_model_folder,
                expected,
                BLIP_DIFFUSION.hint(),
            )
            or combo_error("weight_dtype", weight_dtype, list(DTYPES))
            or True
        )

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str) -> io.NodeOutput:
        folder = paths.resolve(model_name, what="BLIP-Diffusion model", hint=BLIP_DIFFUSION.hint())
        check_model_folder(folder)
        unet_config, encoder_config = read_configs(folder)
        unet = load_unet(folder, unet_config, DTYPES[weight_dtype])
        return io.NodeOutput(
            unet, load_clip(folder), load_vae(folder), load_encoder(folder, weight_dtype, encoder_config)
        )


class BlipDiffusionSubjectEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionSubjectEncoderLoader",
            display_name="BLIP-Diffusion Subject Encoder Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads only the BLIP-2 subject encoder (Q-Former) of a BLIP-Diffusion model.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=paths.encoder_entries(),
                    tooltip="A BLIP-Diffusion folder in models/blip_diffusion (its qformer/ is used), or a "
                    "single weights file there (released or original LAVIS key names).",
                ),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="auto", tooltip=DTYPE_TIP),
            ],
            outputs=[
                SubjectEncoderType.Output(
                    display_name="subject_encoder", tooltip="The BLIP-2 Q-Former subject encoder."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None = None, weight_dtype: str | None = None):
        expected = (
            f"is neither a model folder with qformer/config.json nor a weights file "
            f"({', '.join(sorted(WEIGHT_SUFFIXES))})"
        )
        return (
            paths.entry_error(
                "model_name",
                model_name,
                paths.MODELS,
                "subject encoder",
                is_encoder_entry,
                expected,
                BLIP_DIFFUSION.hint(),
            )
            or combo_error("weight_dtype", weight_dtype, list(DTYPES))
            or True
        )

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str) -> io.NodeOutput:
        path = paths.resolve(model_name, what="subject encoder", hint=BLIP_DIFFUSION.hint())
        return io.NodeOutput(load_encoder(path, weight_dtype))


NODES = [BlipDiffusionLoader, BlipDiffusionSubjectEncoderLoader]
