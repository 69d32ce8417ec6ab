"""Configurations of the subject encoder, read from the released `qformer/config.json`.

The released file is a transformers `Blip2Config` dump. Keys it leaves out take the
defaults of the transformers version that wrote it (4.33), with one deliberate choice:
the vision tower's `layer_norm_eps` defaults to 1e-5, the value of the original
OpenAI-CLIP / LAVIS model. transformers >= 4.34 would silently use 1e-6 instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class VisionConfig:
    """The BLIP-2 vision tower (CLIP ViT-L/14 without its last block for BLIP-Diffusion)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    qkv_bias: bool = True


@dataclass(frozen=True)
class QFormerConfig:
    """The BERT-style Q-Former; every layer cross-attends to the image tokens."""

    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    cross_attention_frequency: int = 1
    encoder_hidden_size: int = 1024
    pad_token_id: int = 0


@dataclass(frozen=True)
class SubjectEncoderConfig:
    vision: VisionConfig = VisionConfig()
    qformer: QFormerConfig = QFormerConfig()
    num_query_tokens: int = 16

    @classmethod
    def from_dict(cls, data: dict) -> SubjectEncoderConfig:
        return cls(
            vision=dataclass_from(VisionConfig, data.get("vision_config") or {}),
            qformer=dataclass_from(QFormerConfig, data.get("qformer_config") or {}),
            num_query_tokens=int(data.get("num_query_tokens", 16)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> SubjectEncoderConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the subject encoder config {path}: {e}") from e
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        """The released layout of `qformer/config.json` (what `from_dict` reads back)."""
        return {
            "architectures": ["Blip2QFormerModel"],
            "model_type": "blip-2",
            "num_query_tokens": self.num_query_tokens,
            "vision_config": {f.name: getattr(self.vision, f.name) for f in fields(VisionConfig)},
            "qformer_config": {f.name: getattr(self.qformer, f.name) for f in fields(QFormerConfig)},
        }


def dataclass_from(cls, data: dict):
    """An instance of the dataclass `cls` with the values of `data` it knows, each cast to its default's type."""
    known = {f.name: f.type for f in fields(cls)}
    values = {}
    for name in known:
        if name in data:
            default = getattr(cls, name)
            values[name] = type(default)(data[name])
    return cls(**values)
