"""Subject files: an encoded subject in a .safetensors file, and import of LAVIS fine-tuned subjects.

Format version 1 (safetensors, never pickle):
  tensor   "embeds"    float32 [N, 16, D], one row per view (D = 768 for BLIP-Diffusion)
  metadata "format"    "blip_diffusion_subject"
           "version"   "1"
           "category"  the subject's category word, e.g. "dog"
           + the subject's own metadata, all strings (the encoder node writes "preprocess",
             "encoder", "image_sha256"; blends add "blend"; LAVIS imports "source", "checkpoint")
A reader checks "format" and "version" before anything else, so a file of a later layout is
reported as such instead of being misread.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .loading import load_pickle
from .subject import MAX_VIEWS, Subject, check_category, check_embeds

FORMAT = "blip_diffusion_subject"
VERSION = "1"
RESERVED = ("format", "version", "category")
MAX_HEADER_BYTES = 1 << 20
WRITERS = "BLIP-Diffusion Save Subject or tools/import_lavis_subject.py"


def save_subject(subject: Subject, path: str | Path) -> None:
    """Write `subject` to `path` (format version 1)."""
    clashes = sorted(set(subject.metadata) & set(RESERVED))
    if clashes:
        raise ValueError(f"subject: metadata keys {clashes} are reserved for the file format")
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "category": subject.category,
        **{k: str(v) for k, v in subject.metadata.items()},
    }
    embeds = subject.embeds.detach().to("cpu", torch.float32).contiguous()
    save_file({"embeds": embeds}, str(path), metadata=metadata)


def load_subject(path: str | Path) -> Subject:
    """Read a subject file; a file of another kind or version is an error that says what was expected.

    Whoever can reach a ComfyUI server can upload such a file, so it is read as hostile data: its header
    (and so its metadata) is bounded before it is parsed, the tensor's shape is checked before it is read,
    and the values are checked (Subject) before anything uses them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subject file not found: {path}")
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    if header > path.stat().st_size - 8:
        raise ValueError(
            f"{path.name} is not a readable .safetensors file (truncated or corrupt?): its header "
            "is longer than the file"
        )
    if header > MAX_HEADER_BYTES:
        raise ValueError(
            f"{path.name}: a subject file's header (its metadata) of {header} bytes; subject files "
            f"hold a few hundred (at most {MAX_HEADER_BYTES})"
        )
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            if metadata.get("format") != FORMAT:
                raise ValueError(
                    f"{path.name} is not a BLIP-Diffusion subject file: expected metadata "
                    f"format={FORMAT!r}, as written by {WRITERS}"
                )
            if metadata.get("version") != VERSION:
                raise ValueError(
                    f"{path.name} is a subject file of format version {metadata.get('version')!r}; "
                    f"this pack reads version {VERSION!r} (a newer pack wrote it? update this one)"
                )
            if "embeds" not in f.keys():
                raise ValueError(
                    f"{path.name}: a subject file of version {VERSION} needs an 'embeds' tensor; "
                    f"it holds {sorted(f.keys())}"
                )
            shape = f.get_slice("embeds").get_shape()
            if len(shape) != 3 or not 1 <= shape[0] <= MAX_VIEWS:
                raise ValueError(
                    f"{path.name}: subject embeddings of shape {tuple(shape)}; expected [views, 16, width] "
                    f"with 1 to {MAX_VIEWS} views"
                )
            embeds = f.get_tensor("embeds")
    except SafetensorError as e:
        raise ValueError(f"{path.name} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    check_embeds(embeds, path.name)
    category = check_category(metadata.get("category", ""), path.name)
    extra = {k: v for k, v in metadata.items() if k not in RESERVED}
    return Subject(embeds.float(), category, extra)


def read_lavis_ctx_cache(path: str | Path) -> torch.Tensor:
    """`ctx_embeddings_cache` of a LAVIS BLIP-Diffusion fine-tuned checkpoint, [1, 16, 768].

    Accepts a training checkpoint (the tensor under "model", or at the top level) and the
    bare tensor of a pretrained folder's ctx_embeddings_cache/ctx_embeddings_cache.pt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LAVIS checkpoint not found: {path}")
    data = load_pickle(path)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    cache = data.get("ctx_embeddings_cache") if isinstance(data, dict) else data
    if not isinstance(cache, torch.Tensor):
        raise ValueError(
            f"{path} has no ctx_embeddings_cache tensor: expected a LAVIS BLIP-Diffusion fine-tuned "
            "checkpoint (the tensor under 'model') or a ctx_embeddings_cache.pt"
        )
    check_embeds(cache, str(path))
    if not cache.any():
        # LAVIS initialises the cache to zeros; only fine-tuning fills it.
        raise ValueError(
            f"{path}: ctx_embeddings_cache is all zeros, so this checkpoint was not fine-tuned on a subject"
        )
    return cache.float()


def subject_from_lavis(path: str | Path, category: str) -> Subject:
    """A LAVIS fine-tuned subject (its cached embeddings) as a Subject named `category`."""
    return Subject(
        read_lavis_ctx_cache(path),
        check_category(category, "category"),
        {"source": "LAVIS ctx_embeddings_cache", "checkpoint": Path(path).name},
    )
