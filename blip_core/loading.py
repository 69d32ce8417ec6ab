"""Reading weight files safely and loading them strictly.

Weights come from `.safetensors`, or from pickle `.bin`/`.pt`/`.pth` files read with
`torch.load(weights_only=True)`, which refuses any pickle that would run code.
Every failure names the file and says what was expected.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from .layout import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    if suffix in PICKLE_SUFFIXES:
        return _unwrap(load_pickle(path), path)
    raise ValueError(f"unsupported weights file {path}: expected .safetensors or a pickle .bin/.pt/.pth")


def load_pickle(path: str | Path):
    """A PyTorch pickle file read with `torch.load(weights_only=True)`: tensors and plain containers only.

    Zip-format files (everything torch has written since 1.6) are memory-mapped, not copied.
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # torch's own message advises retrying with weights_only=False, the one thing never to do
        # with a file that may run code; say what was found and what to use instead.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f": it would import or call {found.group(1)}" if found else ""
        raise ValueError(
            f"refused to load {path}: it is not a plain tensor checkpoint (torch.load weights_only=True "
            f"rejected it{what}). Weights files hold only tensors; this one may run code when "
            "unpickled. Use a .safetensors file or the original download."
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e


def _unwrap(data, path: Path) -> dict[str, torch.Tensor]:
    """Training checkpoints nest the weights under 'model' or 'state_dict'."""
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return data


def load_strict(
    module: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str | Path,
    device: str | torch.device = "cpu",
    progress=None,
) -> None:
    """Give `module` (built on the meta device) the tensors of `state_dict`, cast to its dtypes.

    Any missing, unexpected or mis-shaped tensor is an error naming it and `source`. When every
    tensor already has the right dtype on the CPU they are used as they are: a memory-mapped
    file is then read lazily instead of copied. `progress(done, total)` follows the conversion.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{k} {tuple(state_dict[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if items:
            shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{source} does not match the expected model: " + "; ".join(problems))
    converted, kept = {}, []
    for i, (name, target) in enumerate(expected.items(), 1):
        converted[name] = state_dict[name].to(device=device, dtype=target.dtype)
        if converted[name] is state_dict[name]:
            kept.append(name)
        if progress is not None:
            progress(i, len(expected))
    if len(kept) < len(converted):
        # Some tensors were converted, so the file's pages were all read; a tensor kept as a view
        # of the mapped file (e.g. a float32 LayerNorm) would keep every page of it resident.
        for name in kept:
            converted[name] = converted[name].clone()
    module.load_state_dict(converted, strict=True, assign=True)
