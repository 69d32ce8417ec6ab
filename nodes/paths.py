"""Model folders of the pack, and resolving user-chosen names safely inside them."""

from __future__ import annotations

from pathlib import Path

from ..blip_core.layout import (
    ANNOTATORS_FOLDER,
    CONFIG,
    CONTROLNET,
    CONTROLNETS_FOLDER,
    MODEL_INDEX,
    MODELS_FOLDER,
    QFORMER,
    WEIGHT_SUFFIXES,
)
from ..blip_core.messages import quoted
from . import compat

MODELS, CONTROLNETS, ANNOTATORS = MODELS_FOLDER, CONTROLNETS_FOLDER, ANNOTATORS_FOLDER
SUBJECTS = "blip_diffusion_subjects"
SUBJECT_SUFFIX = ".safetensors"  # subject files are never pickle
INPUT_TAG = " [input]"  # ComfyUI's annotation for a file of the input folder (folder_paths.annotated_filepath)
MAX_NAME = 1024  # characters of a user-typed name (file systems allow 255 a part, 4096 a path)
MAX_PART = 255


def register() -> None:
    """The pack's model folders (blip_diffusion, blip_diffusion_subjects, annotators) in models/, keeping
    extra paths from extra_model_paths.yaml."""
    for kind in (MODELS, SUBJECTS, ANNOTATORS):
        compat.register_model_folder(kind)


def roots(kind: str = MODELS) -> list[Path]:
    return compat.folders(kind)


def _folders_holding(marker: str) -> set[str]:
    """Names of the folders directly under models/blip_diffusion (every root) that hold `marker`."""
    return {p.relative_to(root).parts[0] for root in roots() if root.is_dir() for p in root.glob(f"*/{marker}")}


def model_folders() -> list[str]:
    """Folders under models/blip_diffusion with a `model_index.json` (the released layout)."""
    return sorted(_folders_holding(MODEL_INDEX))


def encoder_entries() -> list[str]:
    """Model folders (their qformer/ is used) and single subject-encoder weight files."""
    files = {
        p.name
        for root in roots()
        if root.is_dir()
        for p in root.iterdir()
        if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES
    }
    return sorted(_folders_holding(f"{QFORMER.folder}/{CONFIG}") | files)


def controlnet_entries() -> list[str]:
    """BLIP-Diffusion folders with a controlnet/ (the -controlnet release), then models/controlnet files."""
    return sorted(_folders_holding(f"{CONTROLNET.folder}/{CONFIG}")) + compat.filenames(CONTROLNETS)


def release_with_controlnet(name: str) -> Path | None:
    """The BLIP-Diffusion folder `name` in models/blip_diffusion if it holds a controlnet/, else None."""
    if escapes(name) or malformed(name):
        return None
    return next((root / name for root in roots() if (root / name / CONTROLNET.folder / CONFIG).is_file()), None)


def is_weights_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES


def annotator_entries() -> list[str]:
    """Folders and weight files directly in models/annotators."""
    names = set()
    for root in roots(ANNOTATORS):
        if root.is_dir():
            names.update(p.name for p in root.iterdir() if p.is_dir() or p.suffix.lower() in WEIGHT_SUFFIXES)
    return sorted(names)


def resolve(name: str, kind: str = MODELS, what: str = "model", hint: str = "") -> Path:
    """The path of `name` inside one of the `kind` folders; never outside them. `hint` (where to get it) ends
    the error when it is not there."""
    return _inside(name, roots(kind), f"models/{kind}", what, hint)


def entry_error(
    input_name: str, name: str | None, kind: str, what: str, is_entry, expected: str, hint: str = ""
) -> str | None:
    """Why a loader's `name` is not an entry of its list, or None (also for a linked value).

    ComfyUI does not check V3 combo values, so a loader checks its own in `validate_inputs`:
    a path, a name that is not there, or an entry that lacks what makes it listed (`is_entry(path)`
    is false; `expected` says what). Only that one name is looked at, not the whole folder.
    The message starts with the input's name: ComfyUI repeats it under every input the
    validation function takes.
    """
    if name is None:
        return None
    try:
        path = resolve(name, kind, what, hint)
    except (ValueError, OSError) as e:
        return f"{input_name}: {e}"
    return None if is_entry(path) else f"{input_name}: {what} {quoted(name)} is in models/{kind} but {expected}"


def escapes(name: str) -> bool:
    """Whether a user-typed relative name could point outside the folder it is joined to.

    `anchor` also catches a drive or a root without a drive ("\\x" on Windows), which
    `is_absolute()` lets through and which would replace the folder when joined.
    """
    candidate = Path(name)
    return not name.strip() or bool(candidate.anchor) or ".." in candidate.parts


def malformed(name: str) -> str | None:
    """Why a name cannot be a file name at all (control characters, a length no file system takes), or None."""
    if any(ord(c) < 32 for c in name):
        return "it holds control characters"
    if len(name) > MAX_NAME or any(len(part) > MAX_PART for part in Path(name).parts):
        return f"it is {len(name)} characters long (file names take at most {MAX_PART} a part)"
    return None


def _inside(name: str, folders: list[Path], where: str, what: str, hint: str = "") -> Path:
    if escapes(name):
        raise ValueError(f"{what} {quoted(name)} must be a name inside {where}, not a path")
    problem = malformed(name)
    if problem:
        raise ValueError(f"{what} {quoted(name)} is not a file name: {problem}")
    for root in folders:
        path = root / name  # lexically inside root; links an admin placed there are followed
        if path.exists():
            return path
    searched = ", ".join(str(r) for r in folders)
    raise FileNotFoundError(
        f"{what} {quoted(name)} not found in {where} (searched: {searched})" + (f"; {hint}" if hint else "")
    )


def prefix_error(prefix: str | None) -> str | None:
    """Why a saver's `filename_prefix` would leave the output folder or make no file name, or None. (None in:
    the value is linked.)"""
    if prefix is None:
        return None
    expected = (
        "expected a name inside the output folder, optionally with subfolders, e.g. 'blip_diffusion/subjects/cat'"
    )
    if escapes(prefix):
        return f"filename_prefix {quoted(prefix)}: {expected}"
    problem = malformed(prefix) or (
        "its file name part is empty or hidden (starts with '.')"
        if Path(prefix).name in ("", ".") or prefix.endswith(("/", "\\")) or Path(prefix).name.startswith(".")
        else None
    )
    if problem:
        return f"filename_prefix {quoted(prefix)}: {problem}; {expected}"
    return None


def output_file(prefix: str, suffix: str) -> tuple[Path, str]:
    """The next numbered file for `prefix` in the output folder (`<prefix>_00001_<suffix>`), and its subfolder."""
    error = prefix_error(prefix)
    if error:
        raise ValueError(error)
    return compat.output_file(prefix, suffix)


def subject_files() -> list[str]:
    """Subject files in models/blip_diffusion_subjects (with subfolders), then those in the input folder, tagged."""
    inputs = sorted(p.name + INPUT_TAG for p in compat.input_directory().glob("*" + SUBJECT_SUFFIX) if p.is_file())
    return [*compat.filenames(SUBJECTS, (SUBJECT_SUFFIX,)), *inputs]


def resolve_subject_file(name: str) -> Path:
    """A `subject_files()` entry -> its path, inside models/blip_diffusion_subjects or the input folder."""
    if name.endswith(INPUT_TAG):
        path = _inside(name[: -len(INPUT_TAG)], [compat.input_directory()], "the input folder", "subject_file")
    else:
        path = _inside(
            name,
            roots(SUBJECTS),
            f"models/{SUBJECTS} (or the input folder, tagged {INPUT_TAG.strip()})",
            "subject_file",
        )
    if path.suffix.lower() != SUBJECT_SUFFIX:
        raise ValueError(
            f"subject_file {quoted(name)}: expected a {SUBJECT_SUFFIX} subject file (subject files are never pickle)"
        )
    if not path.is_file():
        raise ValueError(f"subject_file {quoted(name)} is a folder, not a subject file")
    return path
