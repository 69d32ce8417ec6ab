"""Model folders of the pack, and resolving user-chosen names safely inside them."""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

MODELS = "blip_diffusion"
ANNOTATORS = "annotators"  # preprocessor weights, e.g. models/annotators/Annotators/ControlNetHED.pth
CONTROLNETS = "controlnet"  # ComfyUI's own folder
WEIGHT_SUFFIXES = {".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt"}


def register() -> None:
    """`models/blip_diffusion` and `models/annotators`, keeping any extra paths from extra_model_paths.yaml."""
    for kind in (MODELS, ANNOTATORS):
        default = os.path.join(folder_paths.models_dir, kind)
        paths = folder_paths.folder_names_and_paths.get(kind, ([], set()))[0]
        if default not in paths:
            paths = [default, *paths]
        folder_paths.folder_names_and_paths[kind] = (paths, set(folder_paths.supported_pt_extensions))


def roots(kind: str = MODELS) -> list[Path]:
    return [Path(p) for p in folder_paths.get_folder_paths(kind)]


def model_folders() -> list[str]:
    """Folders under models/blip_diffusion with a `model_index.json` (the released layout)."""
    names = set()
    for root in roots():
        if root.is_dir():
            names.update(p.parent.name for p in root.glob("*/model_index.json"))
    return sorted(names)


def encoder_entries() -> list[str]:
    """Model folders (their qformer/ is used) and single subject-encoder weight files."""
    names = set()
    for root in roots():
        if root.is_dir():
            names.update(p.parent.parent.name for p in root.glob("*/qformer/config.json"))
            names.update(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES)
    return sorted(names)


def controlnet_entries() -> list[str]:
    """BLIP-Diffusion folders with a controlnet/ (the -controlnet release), then models/controlnet files."""
    names = set()
    for root in roots():
        if root.is_dir():
            names.update(p.parent.parent.name for p in root.glob("*/controlnet/config.json"))
    return sorted(names) + folder_paths.get_filename_list(CONTROLNETS)


def annotator_entries() -> list[str]:
    """Folders and weight files directly in models/annotators."""
    names = set()
    for root in roots(ANNOTATORS):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.is_dir() or p.suffix.lower() in WEIGHT_SUFFIXES)
    return sorted(names)


def resolve(name: str, kind: str = MODELS, what: str = "model") -> Path:
    """The path of `name` inside one of the `kind` folders; never outside them."""
    candidate = Path(name)
    if not name or candidate.is_absolute() or ".." in candidate.parts:
        raise ValueError(f"{what} {name!r} must be a name inside models/{kind}, not a path")
    for root in roots(kind):
        path = root / candidate  # lexically inside root; links an admin placed there are followed
        if path.exists():
            return path
    searched = ", ".join(str(r) for r in roots(kind))
    raise FileNotFoundError(f"{what} {name!r} not found in models/{kind} (searched: {searched})")
