"""The one module that imports ComfyUI's node API (V3), so the pack can pin a version in one edit."""

from comfy_api.latest import ComfyExtension, io, ui

SubjectEncoderType = io.Custom("BLIPD_SUBJECT_ENCODER")
SubjectType = io.Custom("BLIPD_SUBJECT")

CATEGORY = "BLIP-Diffusion"

__all__ = ["CATEGORY", "ComfyExtension", "SubjectEncoderType", "SubjectType", "io", "ui"]
