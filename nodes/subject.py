"""The subject encoder at run time (BLIPD_SUBJECT_ENCODER) and the node that encodes a photo + category."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..blip_core.config import SubjectEncoderConfig
from ..blip_core.preprocess import MODES, encoder_view
from ..blip_core.subject import MAX_VIEWS, Subject, check_category
from ..blip_core.subject_encoder import SubjectEncoder, load_subject_encoder
from . import compat
from .api import CATEGORY, SubjectEncoderType, SubjectType, combo_error, io, ui

DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedSubjectEncoder:
    """The BLIPD_SUBJECT_ENCODER payload: the core encoder, the patcher that places it in ComfyUI's
    model management, and the precision it computes in."""

    encoder: SubjectEncoder
    patcher: compat.ModelPatcher
    compute_dtype: torch.dtype

    @torch.no_grad()
    def encode(self, view: np.ndarray, category: str) -> torch.Tensor:
        """The embeddings of what the vision tower sees (preprocess.encoder_view)."""
        compat.load_models_gpu([self.patcher])
        out = self.encoder.encode_view(view, category, device=self.patcher.load_device, dtype=self.compute_dtype)
        return out.to(compat.intermediate_device())


def encoder_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The subject encoder's precision. auto: ComfyUI's text-encoder precision flags when given
    (--fp32-text-enc, --force-fp32, ...); on a GPU its text-encoder dtype; on a CPU bfloat16 where
    the CPU computes it natively, else float32 (LayerNorms always run in float32)."""
    if DTYPES[choice] is not None:
        return DTYPES[choice]
    chosen = compat.text_encoder_dtype(device)
    if chosen is not None:
        return chosen
    return torch.bfloat16 if compat.cpu_has_fast_bf16() else torch.float32


def load_encoder(path: Path, dtype_choice: str, config: SubjectEncoderConfig | None = None) -> LoadedSubjectEncoder:
    """The subject encoder of a model folder or weights file, in ComfyUI's model management (`config`: its
    already checked configuration, if the caller read it)."""
    load_device, offload_device = compat.text_encoder_devices()
    dtype = encoder_dtype(dtype_choice, load_device)
    pbar = compat.ProgressBar(100)

    def progress(done: int, total: int) -> None:
        percent = done * 100 // total
        if percent != pbar.current:
            pbar.update_absolute(percent)

    encoder = load_subject_encoder(
        path, device=offload_device, dtype=dtype, operations=compat.manual_cast, config=config, progress=progress
    )
    patcher = compat.ModelPatcher(encoder.model, load_device=load_device, offload_device=offload_device)
    logging.info("BLIP-Diffusion: subject encoder %s loaded (%s)", path.name, dtype)
    return LoadedSubjectEncoder(encoder, patcher, dtype)


def category_error(subject: str | None) -> str | None:
    if subject is None:
        return None
    try:
        check_category(subject)
    except ValueError as e:
        return str(e)
    return None


class BlipDiffusionSubjectEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionSubjectEncoder",
            display_name="BLIP-Diffusion Subject Encoder",
            category=f"{CATEGORY}/subject",
            description="Turns a photo of your subject and its category word into BLIP-Diffusion subject embeddings "
            "(16 vectors in CLIP's token space). Shows the 224x224 image(s) it encoded, after the mask and the "
            "squash or crop: check that the subject is all there.",
            inputs=[
                SubjectEncoderType.Input(
                    "subject_encoder", tooltip="From a BLIP-Diffusion Loader or Subject Encoder Loader."
                ),
                io.Image.Input(
                    "image",
                    tooltip="The subject photo. A batch means several views of the same subject "
                    "(see the prompt fuse's multi_image). Alpha is ignored: use the mask.",
                ),
                io.String.Input(
                    "subject",
                    default="dog",
                    tooltip="The subject's category in a word or two, e.g. 'dog', 'teapot', 'backpack'.",
                ),
                io.Combo.Input(
                    "preprocess",
                    options=list(MODES),
                    default="squash",
                    tooltip="squash: resize to 224x224 ignoring the aspect ratio (the diffusers release). "
                    "crop: short side to 224, then a center crop (the original LAVIS code).",
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip="Optional: 1 on the subject, 0 on the background, which is painted white before "
                    "encoding. Resized to the image. A LoadImage alpha mask is the inverse: use InvertMask.",
                ),
            ],
            outputs=[SubjectType.Output(display_name="subject", tooltip="The subject embeddings and category.")],
        )

    @classmethod
    def validate_inputs(cls, subject: str | None = None, preprocess: str | None = None):
        return category_error(subject) or combo_error("preprocess", preprocess, MODES) or True

    @classmethod
    def execute(cls, subject_encoder, image, subject: str, preprocess: str, mask=None) -> io.NodeOutput:
        if image.ndim == 4 and image.shape[0] > MAX_VIEWS:  # refused before minutes of encoding, not after
            raise ValueError(f"image: a batch of {image.shape[0]} photos; a subject has at most {MAX_VIEWS} views")
        view = encoder_view(image, preprocess, mask)
        embeds = subject_encoder.encode(view, subject)
        metadata = {
            "preprocess": preprocess,
            "encoder": subject_encoder.encoder.name,
            "image_sha256": hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest(),
        }
        # On the node, as PreviewImage shows its images (temporary files): exactly the pixels encoded.
        seen = ui.PreviewImage(torch.from_numpy(view).float() / 255, cls=cls)
        return io.NodeOutput(Subject(embeds, subject, metadata), ui=seen)


NODES = [BlipDiffusionSubjectEncoder]
