"""BLIP-Diffusion for ComfyUI: subject-driven generation from one photo, no fine-tuning.

ComfyUI imports this package; the nodes (and torch-heavy modules) load in comfy_entrypoint.
"""

WEB_DIRECTORY = "./web"  # the front-end extension that shows Save Subject's file on the node


async def comfy_entrypoint():
    from .nodes import BlipDiffusionExtension

    return BlipDiffusionExtension()
