"""LAVIS BLIP-Diffusion fine-tuned checkpoints (`checkpoint_N.pth`, written by LAVIS's runner).

Layout (lavis/runners/runner_base.py `_save_checkpoint`):
    {"model": {"unet.<diffusers UNet name>": tensor, ..., "ctx_embeddings_cache": [1, 16, 768],
               plus the buffers of the frozen parts (e.g. text_encoder.text_model.embeddings.position_ids)},
     "optimizer": AdamW's state (about three times the UNet), "config": the run's settings as plain containers,
     "scaler": ..., "epoch": N}
Only trained parameters are kept under "model" (the whole UNet and the subject, in the original recipe).

The file is read with torch.load(weights_only=True), memory-mapped (blip_core.loading.load_pickle): a tensor
is read from disk only when used, so the optimizer state, mapped but never touched, costs no memory and is
dropped at once. A file that would run code when unpickled is refused before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .finetune import SUBJECT_NAME, UNET_PREFIX
from .layout import SAFETENSORS_SUFFIXES
from .loading import load_pickle, read_state_dict
from .subject import check_embeds

# Parts LAVIS keeps frozen unless its config says otherwise (then the checkpoint holds their trained weights).
TRAINABLE_PARTS = {
    "sd_train_text_encoder": "the text encoder",
    "qformer_train": "the Q-Former",
    "proj_train": "the projection",
}
FOREIGN_HINTS = (
    ("model.diffusion_model.", "a Stable Diffusion checkpoint: load it with ComfyUI's checkpoint loader"),
    ("visual_encoder.", "a BLIP-2 / LAVIS vision-language checkpoint"),
    ("Qformer.", "a BLIP-2 / LAVIS vision-language checkpoint"),
)


@dataclass
class LavisFinetuned:
    unet: dict[str, torch.Tensor]  # the fine-tuned UNet tensors by diffusers name
    subject: torch.Tensor  # the learned subject, [1, 16, D]
    category: str | None  # the subject word of the run's config, when the checkpoint holds it


def model_dict(data, path: Path) -> dict:
    """The state dict of a LAVIS checkpoint: its "model" entry, or the checkpoint itself when flat (or, to say
    what another training checkpoint holds, its "state_dict")."""
    model = data
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            model = data[key]
            break
    if not isinstance(model, dict):
        raise ValueError(f"{path.name}: not a LAVIS checkpoint (it holds a {type(data).__name__}, not a dict)")
    return model


def subject_tensor(model: dict, path: Path) -> torch.Tensor:
    """The checkpoint's `ctx_embeddings_cache`, checked: [1, 16, D] floats, fine-tuned (not all zeros)."""
    cache = model.get(SUBJECT_NAME)
    if not isinstance(cache, torch.Tensor):
        raise ValueError(
            f"{path.name} has no {SUBJECT_NAME} tensor: expected a LAVIS BLIP-Diffusion fine-tuned checkpoint "
            "(checkpoint_N.pth, the tensor under 'model')"
        )
    check_embeds(cache, path.name)
    if cache.shape[0] != 1:
        raise ValueError(f"{path.name}: {SUBJECT_NAME} has shape {tuple(cache.shape)}; LAVIS stores [1, 16, D]")
    if not cache.any():  # LAVIS initialises the cache to zeros; only fine-tuning fills it
        raise ValueError(
            f"{path.name}: {SUBJECT_NAME} is all zeros, so this checkpoint was not fine-tuned on a subject"
        )
    return cache.float()


def _category(config) -> str | None:
    """The subject word of the run (datasets.<name>.build_info.subject_text), when the config holds one."""
    datasets = config.get("datasets") if isinstance(config, dict) else None
    for dataset in (datasets or {}).values():
        word = (dataset.get("build_info") or {}).get("subject_text") if isinstance(dataset, dict) else None
        if isinstance(word, str) and word.strip():
            return word.strip()
    return None


def _refuse_other_trained_parts(config, path: Path) -> None:
    model_config = config.get("model") if isinstance(config, dict) else None
    trained = [
        what for key, what in TRAINABLE_PARTS.items() if isinstance(model_config, dict) and model_config.get(key)
    ]
    if trained:
        raise ValueError(
            f"{path.name}: this run also fine-tuned {' and '.join(trained)}, which a ComfyUI MODEL cannot carry; "
            "only checkpoints of the original recipe (UNet and subject) load here"
        )


def read_lavis_checkpoint(path: str | Path) -> LavisFinetuned:
    """The fine-tuned UNet and subject of a LAVIS checkpoint (a pickle, or a flat .safetensors of its "model")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LAVIS checkpoint not found: {path}")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        data, config = read_state_dict(path), None
    else:
        data = load_pickle(path)
        config = data.get("config") if isinstance(data, dict) else None
        if isinstance(data, dict):
            data.pop("optimizer", None)  # mapped, never read: let it go now
    model = model_dict(data, path)
    _refuse_other_trained_parts(config, path)
    unet = {
        k[len(UNET_PREFIX) :]: v for k, v in model.items() if k.startswith(UNET_PREFIX) and isinstance(v, torch.Tensor)
    }
    if not unet:
        found = sorted(model)[:4]
        hint = next((why for prefix, why in FOREIGN_HINTS if any(k.startswith(prefix) for k in model)), None)
        raise ValueError(
            f"{path.name} is not a LAVIS BLIP-Diffusion fine-tuned checkpoint: it holds no {UNET_PREFIX}* weights"
            + (f" ({hint})" if hint else "")
            + f"; found e.g. {found}"
        )
    return LavisFinetuned(unet, subject_tensor(model, path), _category(config))
