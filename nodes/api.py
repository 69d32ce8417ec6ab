"""The one module that imports ComfyUI's node API (V3), so the pack can pin a version in one edit."""

from comfy_api.latest import ComfyExtension, io, ui

SubjectEncoderType = io.Custom("BLIPD_SUBJECT_ENCODER")
SubjectType = io.Custom("BLIPD_SUBJECT")

CATEGORY = "BLIP-Diffusion"

__all__ = ["CATEGORY", "ComfyExtension", "SubjectEncoderType", "SubjectType", "combo_error", "io", "ui"]


def combo_error(node: type[io.ComfyNode], **values) -> str | None:
    """Why a combo value is not one of its options, or None.

    ComfyUI 0.3.75 checks V1 combo values ("Value not in list") but not V3 ones: a stale
    choice in a saved workflow (a sampler of another ComfyUI version, a typo in an API
    prompt) would fail late with an unrelated error or, for some inputs, silently fall
    back. Nodes call this from `validate_inputs`, so the server answers HTTP 400.
    The message starts with the input's name: ComfyUI repeats it under every input the
    validation function takes.
    A linked input arrives as None and is skipped.
    """
    options = {i.id: i.options for i in node.define_schema().inputs if isinstance(i, io.Combo.Input)}
    for name, value in values.items():
        if value is not None and value not in options[name]:
            shown = ", ".join(map(str, options[name][:30])) + (", ..." if len(options[name]) > 30 else "")
            return f"{name}: {value!r} is not one of the choices ({shown}); pick one of them"
    return None
