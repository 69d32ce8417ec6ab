"""ControlNet structure control: loader, apply (native CONDITIONING), canny and HED preprocessors.

The apply node attaches a ControlNet the way ComfyUI's ControlNetApplyAdvanced does (both
CFG halves, strength, start/end, chaining), so stock nodes chain with it. What it adds is
the reference's hint policy: at sampling time, when the output size is known, a control
image of another size is resized like diffusers' BlipDiffusionControlNetPipeline does
(PIL bicubic on the 8-bit image, squashed to the output size), not ComfyUI's nearest-exact
center crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..blip_core.control import resize_control_image
from ..blip_core.layout import BLIP_DIFFUSION_CANNY, CONTROLNET, HED_ANNOTATOR, SCRIBBLE_CONTROLNET
from ..blip_core.loading import load_strict, read_state_dict
from ..blip_core.preprocess import check_images, to_rgb, to_uint8
from . import compat, paths
from .api import CATEGORY, io, number_error
from .models import load_controlnet

HED_FILE = HED_ANNOTATOR.files[0]
# An SD-1.5 ControlNet's hint is the output's size (512-1024); HED's memory grows with its square (~1 GB at 2048).
MAX_RESOLUTION = 2048
CONTROLNET_HINT = (
    f"for the canny ControlNet, {BLIP_DIFFUSION_CANNY.hint()}; for the scribble one, {SCRIBBLE_CONTROLNET.hint()}"
)
RESOLUTION_TIP = (
    "Detection resolution: the short side is scaled to this (both sides rounded to multiples of 64), "
    f"and so is the output. At most {MAX_RESOLUTION}."
)


def reference_hint(hint: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The control image [B,3,H,W] at the output size, resized as the reference resizes it."""
    return resize_control_image(hint.movedim(1, -1), height, width).movedim(-1, 1)


def window_error(start: float | None, end: float | None) -> str | None:
    """Why a start/end window would never run the ControlNet, or None."""
    if start is None or end is None or start < end:
        return None
    relation = "equals" if start == end else "is after"
    return (
        f"start_percent: {start} {relation} end_percent {end}: the window is empty and the ControlNet would never "
        "run; widen it, or use strength 0 for no control"
    )


def check_architecture(control_net, conditionings: list) -> None:
    width = compat.controlnet_context_width(control_net)
    for cond, _ in conditionings:
        if width is not None and cond.shape[-1] != width:
            raise ValueError(
                f"BlipDiffusionControlNetApply: control_net cross-attends to {width}-wide text "
                f"embeddings but the conditioning is {cond.shape[-1]} wide (BLIP-Diffusion and "
                "SD-1.5: 768); load an SD-1.5 ControlNet, not one for another architecture (SDXL: 2048)"
            )


class BlipDiffusionControlNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionControlNetApply",
            display_name="BLIP-Diffusion Apply ControlNet",
            category=f"{CATEGORY}/control",
            description="Adds structure control (edges, scribbles, any SD-1.5 ControlNet) to both the positive and "
            "negative conditioning, as the reference does. Chains with earlier ControlNets, including "
            "ComfyUI's Apply ControlNet. A control image of another size than the output is resized "
            "like the reference (bicubic, squashed to the output size).",
            inputs=[
                io.Conditioning.Input(
                    "positive", tooltip="From the BLIP-Diffusion Multimodal Prompt (or any CONDITIONING)."
                ),
                io.Conditioning.Input(
                    "negative", tooltip="The negative prompt's conditioning; it gets the same control."
                ),
                io.ControlNet.Input(
                    "control_net",
                    tooltip="From the BLIP-Diffusion ControlNet Loader or ComfyUI's "
                    "Load ControlNet Model (an SD-1.5 ControlNet).",
                ),
                io.Image.Input(
                    "image",
                    tooltip="The control image, e.g. from BLIP-Diffusion Canny Edges or HED Edges. "
                    "1 image, or one per latent. Gray is used as RGB; alpha is ignored.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Scales the ControlNet's residuals (the reference: 1.0). 0 = no control.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Where in the denoising the control starts (0 = first step, as the reference).",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Where the control stops (1 = last step, as the reference).",
                ),
                io.Vae.Input(
                    "vae",
                    optional=True,
                    tooltip="Only for ControlNets that work on latents (not SD-1.5 ones): the VAE to encode "
                    "the control image.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    display_name="positive", tooltip="Positive conditioning with the ControlNet attached."
                ),
                io.Conditioning.Output(
                    display_name="negative", tooltip="Negative conditioning with the ControlNet attached."
                ),
            ],
        )

    @classmethod
    def validate_inputs(
        cls, strength: float | None = None, start_percent: float | None = None, end_percent: float | None = None
    ):
        return (
            number_error(cls, strength=strength, start_percent=start_percent, end_percent=end_percent)
            or window_error(start_percent, end_percent)
            or True
        )

    @classmethod
    def execute(
        cls, positive, negative, control_net, image, strength: float, start_percent: float, end_percent: float, vae=None
    ) -> io.NodeOutput:
        error = window_error(start_percent, end_percent)  # again: linked values skip validate_inputs
        if error:
            raise ValueError(f"BlipDiffusionControlNetApply: {error}")
        if strength == 0:  # exactly no control, as ComfyUI's Apply ControlNet
            return io.NodeOutput(positive, negative)
        check_architecture(control_net, positive + negative)
        hint = to_rgb(image).movedim(-1, 1)
        # positive and negative entries with the same earlier chain share one ControlNet object, so
        # ComfyUI batches both CFG halves in one ControlNet call, as the reference does
        attached = {}
        outputs = []
        for conditioning in (positive, negative):
            out = []
            for cond, extra in conditioning:
                previous = extra.get("control")
                if previous not in attached:
                    attached[previous] = compat.attach_controlnet(
                        control_net, hint, strength, (start_percent, end_percent), vae, previous, reference_hint
                    )
                out.append([cond, {**extra, "control": attached[previous], "control_apply_to_uncond": False}])
            outputs.append(out)
        return io.NodeOutput(*outputs)


class BlipDiffusionControlNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionControlNetLoader",
            display_name="BLIP-Diffusion ControlNet Loader",
            category=f"{CATEGORY}/loaders",
            description="Loads the ControlNet of a BLIP-Diffusion folder (its controlnet/, as in "
            "Salesforce/blipdiffusion-controlnet), or any ControlNet in models/controlnet.",
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=paths.controlnet_entries(),
                    tooltip="A BLIP-Diffusion folder in models/blip_diffusion with a controlnet/ "
                    "(its canny ControlNet), or a file in models/controlnet: diffusers format "
                    "(with its config.json beside it) or a single-file ControlNet.",
                ),
            ],
            outputs=[io.ControlNet.Output(display_name="control_net", tooltip="For BLIP-Diffusion Apply ControlNet.")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None = None):
        if model_name is None or paths.release_with_controlnet(model_name) is not None:
            return True
        expected = "is neither a BLIP-Diffusion folder with controlnet/config.json nor a ControlNet file"
        return (
            paths.entry_error(
                "model_name",
                model_name,
                paths.CONTROLNETS,
                "ControlNet",
                paths.is_weights_file,
                expected,
                CONTROLNET_HINT,
            )
            or True
        )

    @classmethod
    def execute(cls, model_name: str) -> io.NodeOutput:
        release = paths.release_with_controlnet(model_name)
        if release is not None:
            return io.NodeOutput(load_controlnet(CONTROLNET.weights_file(release)))
        return io.NodeOutput(
            load_controlnet(paths.resolve(model_name, paths.CONTROLNETS, what="ControlNet", hint=CONTROLNET_HINT))
        )


def detect_each(images: torch.Tensor, detect) -> torch.Tensor:
    """Run a controlnet-aux detector (uint8 HxWxC -> uint8 HxWx3) on every image of a batch."""
    check_images(images)
    maps = np.stack([detect(pixels) for pixels in to_uint8(images)])
    return torch.from_numpy(maps.astype(np.float32) / 255.0)


class BlipDiffusionCannyEdges(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionCannyEdges",
            display_name="BLIP-Diffusion Canny Edges",
            category=f"{CATEGORY}/control",
            description="Canny edge map for a canny ControlNet (controlnet-aux's CannyDetector, as the reference's "
            "example uses it). Dense edges (low thresholds) work best for stylization.",
            inputs=[
                io.Image.Input("image", tooltip="The photo whose structure to keep. Alpha is composited over white."),
                io.Int.Input(
                    "low_threshold",
                    default=30,
                    min=0,
                    max=255,
                    tooltip="Canny's lower hysteresis threshold (0-255); the reference example uses 30.",
                ),
                io.Int.Input(
                    "high_threshold",
                    default=70,
                    min=0,
                    max=255,
                    tooltip="Canny's upper hysteresis threshold (0-255); the reference example uses 70.",
                ),
                io.Int.Input("resolution", default=512, min=64, max=MAX_RESOLUTION, step=64, tooltip=RESOLUTION_TIP),
            ],
            outputs=[io.Image.Output(display_name="edges", tooltip="White edges on black, RGB.")],
        )

    @classmethod
    def execute(cls, image, low_threshold: int, high_threshold: int, resolution: int) -> io.NodeOutput:
        from controlnet_aux.canny import CannyDetector  # heavy (controlnet-aux imports all its detectors)

        canny = CannyDetector()
        return io.NodeOutput(
            detect_each(
                image,
                lambda pixels: canny(
                    pixels, low_threshold, high_threshold, detect_resolution=resolution, image_resolution=resolution
                ),
            )
        )


def hed_weights(annotator: str) -> Path:
    """`models/annotators/<annotator>` itself if it is a file, else the ControlNetHED.pth in (or below) it."""
    path = paths.resolve(annotator, paths.ANNOTATORS, what="annotator", hint=HED_ANNOTATOR.hint())
    if path.is_file():
        return path
    found = sorted(path.rglob(HED_FILE))
    if not found:
        raise FileNotFoundError(
            f"annotator {annotator!r}: no {HED_FILE} in {path}; download it from {HED_ANNOTATOR.page} into that folder"
        )
    return found[0]


def load_hed(path: Path):
    """controlnet-aux's HED detector with weights read safely (never its own torch.load or download)."""
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector  # heavy, see the canny node

    network = ControlNetHED_Apache2()
    load_strict(network, read_state_dict(path), path)
    return HEDdetector(network.float().eval().to(compat.torch_device()))


class BlipDiffusionHEDEdges(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionHEDEdges",
            display_name="BLIP-Diffusion HED Edges",
            category=f"{CATEGORY}/control",
            description="Soft HED edges, or a scribble made from them, for an HED or scribble ControlNet "
            f"(controlnet-aux's HEDdetector with {HED_FILE} from models/annotators; nothing is downloaded).",
            inputs=[
                io.Image.Input("image", tooltip="The photo whose structure to keep. Alpha is composited over white."),
                io.Combo.Input(
                    "annotator",
                    options=paths.annotator_entries(),
                    tooltip=f"A folder in models/annotators holding {HED_FILE} (from lllyasviel/Annotators), "
                    "or the file itself.",
                ),
                io.Boolean.Input(
                    "scribble",
                    default=False,
                    tooltip="Thin the edges into binary scribble lines. Off: soft HED edges, which is what "
                    "the reference's scribble example feeds the scribble ControlNet.",
                ),
                io.Boolean.Input(
                    "safe", default=False, tooltip="Quantize the edge strengths to fewer levels (HED safe mode)."
                ),
                io.Int.Input("resolution", default=512, min=64, max=MAX_RESOLUTION, step=64, tooltip=RESOLUTION_TIP),
            ],
            outputs=[io.Image.Output(display_name="edges", tooltip="White edges on black, RGB.")],
        )

    @classmethod
    def validate_inputs(cls, annotator: str):
        try:
            hed_weights(annotator)
        except (ValueError, OSError) as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, image, annotator: str, scribble: bool, safe: bool, resolution: int) -> io.NodeOutput:
        hed = load_hed(hed_weights(annotator))
        return io.NodeOutput(
            detect_each(
                image,
                lambda pixels: hed(
                    pixels,
                    detect_resolution=resolution,
                    image_resolution=resolution,
                    safe=safe,
                    scribble=scribble,
                    output_type="np",
                ),
            )
        )


EDGE_NODES = [BlipDiffusionCannyEdges, BlipDiffusionHEDEdges]  # the nodes that need controlnet-aux
NODES = [BlipDiffusionControlNetLoader, BlipDiffusionControlNetApply, *EDGE_NODES]
