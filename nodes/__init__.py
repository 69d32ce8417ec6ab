"""The pack's ComfyUI extension: one node file per topic, all V3."""

from __future__ import annotations

import importlib.util
import logging

from . import compat, paths
from .api import ComfyExtension, io

paths.register()

from . import control, editing, inversion, loaders, prompt, sampling, subject, subject_tools  # noqa: E402  (after the model folder is registered)


def available_nodes() -> list[type[io.ComfyNode]]:
    """Every node whose dependencies are there: a missing optional package or ComfyUI internal disables
    only the nodes that need it, and the log says which."""
    nodes = [
        *loaders.NODES,
        *subject.NODES,
        *subject_tools.NODES,
        *prompt.NODES,
        *sampling.NODES,
        *inversion.NODES,
        *editing.NODES,
        *control.NODES,
    ]
    # find_spec, not import: controlnet-aux is slow to import and only needed when an edge node runs.
    if importlib.util.find_spec("controlnet_aux") is None:
        names = ", ".join(node.define_schema().display_name for node in control.EDGE_NODES)
        logging.warning(
            f"BLIP-Diffusion: controlnet-aux is not installed, so these nodes are disabled: {names}. "
            "Install it with `pip install controlnet-aux` and restart ComfyUI; the other nodes work."
        )
        nodes = [node for node in nodes if node not in control.EDGE_NODES]
    disabled = compat.disabled_nodes()
    return [node for node in nodes if node.define_schema().node_id not in disabled]


class BlipDiffusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return available_nodes()
