"""The pack's ComfyUI extension: one node file per topic, all V3."""

from __future__ import annotations

from . import paths
from .api import ComfyExtension, io

paths.register()

from . import control, loaders, prompt, sampling, subject, subject_tools  # noqa: E402  (after the model folder is registered)


class BlipDiffusionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*loaders.NODES, *subject.NODES, *subject_tools.NODES, *prompt.NODES, *sampling.NODES, *control.NODES]
