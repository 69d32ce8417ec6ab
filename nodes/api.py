"""The one module that imports ComfyUI's node API, pinned to a version (V3, comfy_api v0.0.2)."""

import math

from comfy_api.v0_0_2 import ComfyExtension, io, ui

from ..blip_core.messages import quoted

SubjectEncoderType = io.Custom("BLIPD_SUBJECT_ENCODER")
SubjectType = io.Custom("BLIPD_SUBJECT")
EditType = io.Custom("BLIPD_EDIT")

CATEGORY = "BLIP-Diffusion"

__all__ = [
    "CATEGORY",
    "ComfyExtension",
    "EditType",
    "SubjectEncoderType",
    "SubjectType",
    "combo_error",
    "io",
    "number_error",
    "ui",
]


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


def number_error(node: type[io.ComfyNode], **values) -> str | None:
    """Why a number input of `node` is not finite or outside the range its schema declares, or None (also for a
    linked input, which arrives as None).

    ComfyUI skips its own min/max check for every input that `validate_inputs` receives, and that check lets NaN
    through anyway (every comparison with NaN is false): cfg NaN would make a black picture, steps 0 would reach
    the sampler. So every FLOAT input of the pack, and every INT input a validate_inputs takes, goes through this
    (tools/lint_safety.py checks it); the limits stay written once, in the schema.
    """
    declared = {spec.id: spec for spec in node.define_schema().inputs}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name}: expected a finite number, got {value}"
        low, high = getattr(declared[name], "min", None), getattr(declared[name], "max", None)
        if low is not None and value < low:
            return f"{name}: {value:g} is below the minimum of {low:g}"
        if high is not None and value > high:
            return f"{name}: {value:g} is above the maximum of {high:g}"
    return None
