"""Configurations of the subject encoder, read from the released `qformer/config.json`.

The released file is a transformers `Blip2Config` dump. Keys it leaves out take the
defaults of the transformers version that wrote it (4.33), with one deliberate choice:
the vision tower's `layer_norm_eps` defaults to 1e-5, the value of the original
OpenAI-CLIP / LAVIS model. transformers >= 4.34 would silently use 1e-6 instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

ACTIVATIONS = ("quick_gelu", "gelu")  # what blip_core.layers implements


def setting(default, low=None, high=None, choices: tuple = ()):
    """A config value and what the pack accepts for it: far wider than any released model, narrow enough that
    a hostile or broken config.json (100,000 layers, a width of 10**9) is refused before anything is built."""
    return field(default=default, metadata={"range": (low, high), "choices": choices})


@dataclass(frozen=True)
class VisionConfig:
    """The BLIP-2 vision tower (CLIP ViT-L/14 without its last block for BLIP-Diffusion)."""

    hidden_size: int = setting(1024, 1, 8192)
    intermediate_size: int = setting(4096, 1, 32768)
    num_hidden_layers: int = setting(23, 1, 64)
    num_attention_heads: int = setting(16, 1, 128)
    image_size: int = setting(224, 14, 1024)
    patch_size: int = setting(14, 1, 224)
    hidden_act: str = setting("quick_gelu", choices=ACTIVATIONS)
    layer_norm_eps: float = setting(1e-5, 0.0, 1.0)
    qkv_bias: bool = setting(True)


@dataclass(frozen=True)
class QFormerConfig:
    """The BERT-style Q-Former; every layer cross-attends to the image tokens."""

    vocab_size: int = setting(30523, 1, 1_000_000)
    hidden_size: int = setting(768, 1, 8192)
    num_hidden_layers: int = setting(12, 1, 64)
    num_attention_heads: int = setting(12, 1, 128)
    intermediate_size: int = setting(3072, 1, 32768)
    hidden_act: str = setting("gelu", choices=ACTIVATIONS)
    max_position_embeddings: int = setting(512, 1, 8192)
    layer_norm_eps: float = setting(1e-12, 0.0, 1.0)
    cross_attention_frequency: int = setting(1, 1, 64)
    encoder_hidden_size: int = setting(1024, 1, 8192)
    pad_token_id: int = setting(0, 0, 1_000_000)


@dataclass(frozen=True)
class SubjectEncoderConfig:
    vision: VisionConfig = VisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    num_query_tokens: int = 16

    @classmethod
    def from_dict(cls, data: dict, source: str = "qformer/config.json") -> SubjectEncoderConfig:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of settings, got a {type(data).__name__}")
        config = cls(
            vision=dataclass_from(VisionConfig, _section(data, "vision_config", source), f"{source}: vision_config"),
            qformer=dataclass_from(
                QFormerConfig, _section(data, "qformer_config", source), f"{source}: qformer_config"
            ),
            num_query_tokens=data.get("num_query_tokens", 16),
        )
        if config.num_query_tokens != 16:
            raise ValueError(f"{source}: num_query_tokens is {config.num_query_tokens!r}; BLIP-Diffusion has 16")
        for name, part in (("vision_config", config.vision), ("qformer_config", config.qformer)):
            if part.hidden_size % part.num_attention_heads:
                raise ValueError(
                    f"{source}: {name}.hidden_size {part.hidden_size} is not a multiple of "
                    f"num_attention_heads {part.num_attention_heads}"
                )
        if config.vision.patch_size > config.vision.image_size:
            raise ValueError(
                f"{source}: vision_config.patch_size {config.vision.patch_size} is larger than its "
                f"image_size {config.vision.image_size}"
            )
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> SubjectEncoderConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the subject encoder config {path}: {e}") from e
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        """The released layout of `qformer/config.json` (what `from_dict` reads back)."""
        return {
            "architectures": ["Blip2QFormerModel"],
            "model_type": "blip-2",
            "num_query_tokens": self.num_query_tokens,
            "vision_config": {f.name: getattr(self.vision, f.name) for f in fields(VisionConfig)},
            "qformer_config": {f.name: getattr(self.qformer, f.name) for f in fields(QFormerConfig)},
        }


def _section(data: dict, name: str, source: str) -> dict:
    section = data.get(name) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{source}: {name} is a {type(section).__name__}, expected an object of settings")
    return section


def dataclass_from(cls, data: dict, source: str = "config"):
    """An instance of the dataclass `cls` with the values of `data` it knows, each checked to have its default's
    type and to lie in the field's range (setting()); an error names `source` and the key."""
    values = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = checked(data[f.name], f.default, f.metadata, f"{source}: {f.name}")
    return cls(**values)


def checked(value, default, metadata, where: str):
    """`value` if it has the type of `default` (an int for a float is fine) and fits `metadata`, else ValueError."""
    kind = type(default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    low, high = metadata.get("range", (None, None))
    choices = metadata.get("choices", ())
    if ok and low is not None:
        ok = low <= value <= high
    if ok and choices:
        ok = value in choices
    if not ok:
        expected = f"one of {list(choices)}" if choices else f"a {kind.__name__}"
        if low is not None:
            expected += f" from {low} to {high}"
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ValueError(f"{where} is {shown}; expected {expected}")
    return kind(value)


# diffusers' UNet2DConditionModel / ControlNetModel configs: the keys the pack reads, their defaults in diffusers
# and what it accepts (SD-1.5 style: at most 6 levels, a few blocks each).
UNET_BLOCKS = {"CrossAttnDownBlock2D", "DownBlock2D"}
UNET_SETTINGS = {
    "in_channels": setting(4, 1, 16),
    "out_channels": setting(4, 1, 16),
    "cross_attention_dim": setting(1280, 1, 8192),
    "use_linear_projection": setting(False),
}


def unet_config(data: dict, source: str) -> dict:
    """The settings of a diffusers UNet or ControlNet config.json the pack reads, checked (types, sizes, block
    kinds), with diffusers' defaults for what is left out; an error names `source` and the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object of settings, got a {type(data).__name__}")
    widths = data.get("block_out_channels", [320, 640, 1280, 1280])
    if not (
        isinstance(widths, list)
        and 1 <= len(widths) <= 6
        and all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 4096 for w in widths)
    ):
        raise ValueError(f"{source}: block_out_channels is {str(widths)[:60]}; expected 1 to 6 widths from 1 to 4096")
    kinds = data.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    if not (isinstance(kinds, list) and len(kinds) == len(widths) and set(kinds) <= UNET_BLOCKS):
        raise ValueError(
            f"{source}: down_block_types is {str(kinds)[:80]}; expected one of {sorted(UNET_BLOCKS)} "
            f"per width of block_out_channels ({len(widths)})"
        )
    out = {"block_out_channels": widths, "down_block_types": kinds}
    for key, per_level, low, high in (("layers_per_block", 2, 1, 8), ("attention_head_dim", 8, 1, 1024)):
        value = data.get(key, per_level)
        values = value if isinstance(value, list) else [value]
        if not (
            len(values) in (1, len(widths))
            and all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in values)
        ):
            raise ValueError(
                f"{source}: {key} is {str(value)[:60]}; expected an integer from {low} to {high} (or one per level)"
            )
        out[key] = value
    for key, spec in UNET_SETTINGS.items():
        out[key] = checked(data[key], spec.default, spec.metadata, f"{source}: {key}") if key in data else spec.default
    return out
