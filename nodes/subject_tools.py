"""Subject tools: blending two subjects, and saving / loading subjects as .safetensors files."""

from __future__ import annotations

import hashlib

from ..blip_core.subject_blend import blend
from ..blip_core.subject_file import load_subject, save_subject
from . import paths
from .api import CATEGORY, SubjectType, io, number_error


class BlipDiffusionSubjectBlend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionSubjectBlend",
            display_name="BLIP-Diffusion Subject Blend",
            category=f"{CATEGORY}/subject",
            description="Interpolates between two subjects: (1 - ratio) x a + ratio x b, as in BLIP-Diffusion's "
            "subject interpolation. Subjects of different categories blend too.",
            inputs=[
                SubjectType.Input("subject_a", tooltip="The subject at ratio 0."),
                SubjectType.Input(
                    "subject_b",
                    tooltip="The subject at ratio 1. Same number of views as subject_a, "
                    "or a single view (used with every view of subject_a).",
                ),
                io.Float.Input(
                    "ratio",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="0 gives subject_a exactly, 1 gives subject_b exactly.",
                ),
                io.String.Input(
                    "category",
                    default="",
                    optional=True,
                    tooltip="The blend's category word (what the prompt calls it). Empty: subject_a's.",
                ),
            ],
            outputs=[SubjectType.Output(display_name="subject", tooltip="The blended subject.")],
        )

    @classmethod
    def validate_inputs(cls, ratio: float | None = None):
        return number_error(cls, ratio=ratio) or True

    @classmethod
    def execute(cls, subject_a, subject_b, ratio: float, category: str = "") -> io.NodeOutput:
        return io.NodeOutput(blend(subject_a, subject_b, ratio, category))


class BlipDiffusionSaveSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionSaveSubject",
            display_name="BLIP-Diffusion Save Subject",
            category=f"{CATEGORY}/subject",
            description="Saves a subject (embeddings, category, provenance) as a .safetensors file in the output "
            "folder and shows its name. Move it to models/blip_diffusion_subjects or input to load it in other "
            "graphs.",
            inputs=[
                SubjectType.Input("subject", tooltip="From a subject encoder, blend or loader."),
                io.String.Input(
                    "filename_prefix",
                    default="blip_diffusion/subjects/subject",
                    tooltip="File name inside the output folder (subfolders allowed); a counter and "
                    ".safetensors are added, e.g. subject_00001_.safetensors.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str | None = None):
        return paths.prefix_error(filename_prefix) or True

    @classmethod
    def execute(cls, subject, filename_prefix: str) -> io.NodeOutput:
        try:
            path, subfolder = paths.output_file(filename_prefix, ".safetensors")
            save_subject(subject, path)
        except OSError as e:  # e.g. a folder of the prefix is a file already
            raise ValueError(f"filename_prefix: cannot write a subject file there: {e}") from None
        # A file locator, as SaveLatent reports its files: the /history entry names what was written; and the
        # same as text, which web/blip_diffusion.js shows on the node.
        written = f"output/{subfolder}/{path.name}" if subfolder else f"output/{path.name}"
        return io.NodeOutput(
            ui={"subjects": [{"filename": path.name, "subfolder": subfolder, "type": "output"}], "text": [written]}
        )


class BlipDiffusionLoadSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionLoadSubject",
            display_name="BLIP-Diffusion Load Subject",
            category=f"{CATEGORY}/subject",
            description="Loads a subject saved by BLIP-Diffusion Save Subject (or imported from a LAVIS fine-tuned "
            "checkpoint): no subject encoder or photo needed.",
            inputs=[
                io.Combo.Input(
                    "subject_file",
                    options=paths.subject_files(),
                    tooltip=f".safetensors subject files in models/{paths.SUBJECTS}, and those in the "
                    f"input folder (marked {paths.INPUT_TAG.strip()}).",
                ),
            ],
            outputs=[SubjectType.Output(display_name="subject", tooltip="The saved subject, bit for bit.")],
        )

    @classmethod
    def validate_inputs(cls, subject_file: str):
        # Replaces ComfyUI's is-it-in-the-list check, so the message names the folders searched.
        try:
            paths.resolve_subject_file(subject_file)
        except (ValueError, OSError) as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, subject_file: str):
        """The file's contents: a file replaced under the same name is loaded again."""
        try:
            return hashlib.sha256(paths.resolve_subject_file(subject_file).read_bytes()).hexdigest()
        except (ValueError, OSError):
            return subject_file  # validation reports the problem

    @classmethod
    def execute(cls, subject_file: str) -> io.NodeOutput:
        return io.NodeOutput(load_subject(paths.resolve_subject_file(subject_file)))


NODES = [BlipDiffusionSubjectBlend, BlipDiffusionSaveSubject, BlipDiffusionLoadSubject]
