"""The one module that imports ComfyUI's node API, pinned to a version (V3, comfy_api v0.0.2)."""

import math

from comfy_api.v0_0_2 import ComfyExtension, io, ui

from ..blip_core.messages import quoted

SubjectEncoderType = io.Custom("BLIPD_SUBJECT_ENCODER")
SubjectType = io.Custom("BLIPD_SUBJECT")

CATEGORY = "BLIP-Diffusion"

__all__ = ["CATEGORY", "ComfyExtension", "SubjectEncoderType", "SubjectType", "combo_error", "io", "number_error", "ui"]


def combo_error(name: str, value, options) -> str | None:
    """Why a combo value is not one of its options, or None (also for a linked input, which arrives as None).

    ComfyUI 0.3.75 checks V1 combo values ("Value not in list") but not V3 ones: a stale
    choice in a saved workflow (a sampler of another ComfyUI version, a typo in an API
    prompt) would fail late with an unrelated error or, for some inputs, silently fall
    back. Nodes call this from `validate_inputs`, so the server answers HTTP 400.
    The message starts with the input's name: ComfyUI repeats it under every input the
    validation function takes.
    """
    if value is None or value in options:
        return None
    shown = ", ".join(map(str, options[:30])) + (", ..." if len(options) > 30 else "")
    return f"{name}: {quoted(value)} is not one of the choices ({shown}); pick one of them"


def number_error(**values) -> str | None:
    """Why a FLOAT input is not a finite number, or None. A JSON prompt can carry NaN, which ComfyUI's min/max
    check lets through (every comparison with NaN is false): cfg NaN would make a black picture. Every FLOAT
    input of the pack goes through this in validate_inputs (tools/lint_safety.py checks it)."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name}: expected a finite number, got {value}"
    return None
