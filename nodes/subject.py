"""Encoding a subject photo (+ its category word) into BLIP-Diffusion subject embeddings."""

from __future__ import annotations

import hashlib

from ..blip_core import Subject
from ..blip_core.preprocess import MODES
from .api import CATEGORY, SubjectEncoderType, SubjectType, combo_error, io


def empty_subject_error(subject: str | None) -> str | None:
    if subject is not None and not subject.strip():
        return "subject: the category is empty; name what the image shows, e.g. 'dog'"
    return None


class BlipDiffusionSubjectEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionSubjectEncoder",
            display_name="BLIP-Diffusion Subject Encoder",
            category=f"{CATEGORY}/subject",
            description="Turns a photo of your subject and its category word into BLIP-Diffusion subject embeddings "
                        "(16 vectors in CLIP's token space).",
            inputs=[
                SubjectEncoderType.Input("subject_encoder", tooltip="From a BLIP-Diffusion Loader or Subject Encoder Loader."),
                io.Image.Input("image", tooltip="The subject photo. A batch means several views of the same subject "
                                                "(see the prompt fuse's multi_image). Alpha is ignored: use the mask."),
                io.String.Input("subject", default="dog",
                                tooltip="The subject's category in a word or two, e.g. 'dog', 'teapot', 'backpack'."),
                io.Combo.Input("preprocess", options=list(MODES), default="squash",
                               tooltip="squash: resize to 224x224 ignoring the aspect ratio (the diffusers release). "
                                       "crop: short side to 224, then a center crop (the original LAVIS code)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: 1 on the subject, 0 on the background, which is painted white before "
                                      "encoding. Resized to the image. A LoadImage alpha mask is the inverse: use InvertMask."),
            ],
            outputs=[SubjectType.Output(display_name="subject", tooltip="The subject embeddings and category.")],
        )

    @classmethod
    def validate_inputs(cls, subject: str | None = None, preprocess: str | None = None):
        return empty_subject_error(subject) or combo_error(cls, preprocess=preprocess) or True

    @classmethod
    def execute(cls, subject_encoder, image, subject: str, preprocess: str, mask=None) -> io.NodeOutput:
        error = empty_subject_error(subject)
        if error:
            raise ValueError(error)
        if image.shape[0] == 0 or image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"image: expected at least one non-empty image, got shape {tuple(image.shape)}")
        embeds = subject_encoder.encode(image, subject.strip(), preprocess, mask)
        metadata = {"preprocess": preprocess, "encoder": subject_encoder.encoder.name,
                    "image_sha256": hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()}
        return io.NodeOutput(Subject(embeds, subject.strip(), metadata))


NODES = [BlipDiffusionSubjectEncoder]
