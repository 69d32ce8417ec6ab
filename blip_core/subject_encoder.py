"""The BLIP-Diffusion subject encoder: image + category word -> 16 context embeddings.

vision tower -> Q-Former (learned queries + BERT-embedded category, cross-attending to
the image) -> projection. The output [B, 16, 768] lives in CLIP's token-embedding space
and is spliced into the prompt by the text encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bert_tokenizer import tokenize_subjects
from .config import SubjectEncoderConfig
from .layout import CONFIG, QFORMER
from .loading import load_strict, read_state_dict
from .preprocess import encoder_view, normalize
from .qformer import ProjLayer, QFormerEncoder, TextEmbeddings, text_attention_mask
from .subject import check_category
from .vision import VisionTransformer


class SubjectEncoderModel(nn.Module):
    """Parameters laid out exactly like the released diffusers `qformer/` checkpoint."""

    def __init__(self, config: SubjectEncoderConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        q = config.qformer
        self.config = config
        self.query_tokens = nn.Parameter(
            torch.empty(1, config.num_query_tokens, q.hidden_size, dtype=dtype, device=device)
        )
        self.embeddings = TextEmbeddings(q, operations, dtype, device)
        self.visual_encoder = VisionTransformer(config.vision, operations, dtype, device)
        self.encoder = QFormerEncoder(q, operations, dtype, device)
        self.proj_layer = ProjLayer(q.hidden_size, 4 * q.hidden_size, q.layer_norm_eps, operations, dtype, device)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        image = self.visual_encoder(pixel_values)
        num_queries = self.query_tokens.shape[1]
        x = self.embeddings(input_ids, self.query_tokens)
        mask = text_attention_mask(text_mask, num_queries, x.dtype)
        x = self.encoder(x, mask, image, num_queries)
        return self.proj_layer(x[:, :num_queries])


class SubjectEncoder:
    """The loaded model with its tokenizer and preprocessing; `encode` is the whole recipe."""

    def __init__(self, model: SubjectEncoderModel, name: str = ""):
        self.model = model.eval()
        self.name = name

    @property
    def config(self) -> SubjectEncoderConfig:
        return self.model.config

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        subjects: str | list[str],
        preprocess: str = "squash",
        mask: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """images [B,H,W,C] in 0..1; one category for all or one per image -> [B,16,hidden] float32."""
        return self.encode_view(encoder_view(images, preprocess, mask), subjects, device, dtype)

    @torch.no_grad()
    def encode_view(
        self,
        view: np.ndarray,
        subjects: str | list[str],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """`encode` from what the vision tower sees (preprocess.encoder_view: uint8 [B,224,224,3])."""
        pixels = normalize(view)
        categories = [subjects] * pixels.shape[0] if isinstance(subjects, str) else list(subjects)
        if len(categories) != pixels.shape[0]:
            raise ValueError(f"{len(categories)} subject categories for {pixels.shape[0]} images")
        ids, text_mask = tokenize_subjects([check_category(c) for c in categories])
        param = next(self.model.parameters())
        device = device or param.device
        dtype = dtype or param.dtype
        out = self.model(pixels.to(device, dtype), ids.to(device), text_mask.to(device))
        return out.float()


def lavis_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original LAVIS BLIP-Diffusion checkpoint (`blip.*`, `proj_layer.*`) to the released layout.

    Tensors the subject encoder does not use (UNet, text encoder, BLIP-2 heads) are dropped.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("proj_layer."):
            out[key] = value
            continue
        if not key.startswith("blip."):
            continue
        key = key[len("blip.") :]
        if key == "query_tokens":
            out[key] = value
        elif key.startswith("Qformer.bert."):
            key = key[len("Qformer.bert.") :]
            out[
                key.replace(".attention.self.", ".attention.attention.").replace(
                    ".crossattention.self.", ".crossattention.attention."
                )
            ] = value
        elif key.startswith("ln_vision."):
            out["visual_encoder.post_layernorm." + key[len("ln_vision.") :]] = value
        elif key.startswith("visual_encoder."):
            renamed = _lavis_vision_key(key[len("visual_encoder.") :], value)
            if renamed is not None:
                out[renamed[0]] = renamed[1]
    return out


_LAVIS_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.in_proj_weight": "self_attn.qkv.weight",
    "attn.in_proj_bias": "self_attn.qkv.bias",
    "attn.out_proj": "self_attn.projection",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _lavis_vision_key(key: str, value: torch.Tensor):
    prefix = "visual_encoder."
    if key == "class_embedding":
        return prefix + "embeddings.class_embedding", value.reshape(1, 1, -1)
    if key == "positional_embedding":
        return prefix + "embeddings.position_embedding", value.unsqueeze(0)
    if key == "conv1.weight":
        return prefix + "embeddings.patch_embedding.weight", value
    if key.startswith("ln_pre."):
        return prefix + "pre_layernorm." + key[len("ln_pre.") :], value
    if key.startswith("transformer.resblocks."):
        index, rest = key[len("transformer.resblocks.") :].split(".", 1)
        for old, new in _LAVIS_BLOCK.items():
            if rest.startswith(old):
                return f"{prefix}encoder.layers.{index}.{new}{rest[len(old) :]}", value
    return None


def _resolve_qformer(path: Path) -> tuple[Path, Path]:
    """(config.json, weights) for a BLIP-Diffusion folder or its `qformer/` folder."""
    folder = path / QFORMER.folder if (path / QFORMER.folder).is_dir() else path
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} is not a BLIP-Diffusion model folder: expected {QFORMER.folder}/{CONFIG} "
            f"and {QFORMER.folder}/{QFORMER.weights[0]} (or {QFORMER.weights[1]}) inside it"
        )
    return folder / CONFIG, QFORMER.weights_in(folder, path.name)


def load_subject_encoder(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    operations=nn,
    config: SubjectEncoderConfig | None = None,
    progress=None,
) -> SubjectEncoder:
    """Load from a BLIP-Diffusion folder (diffusers layout), its `qformer/` folder, or a single weights file.

    A single file may hold the released key layout or an original LAVIS checkpoint; it uses
    `config` (default: the released BLIP-Diffusion configuration). `progress(done, total)` is
    called as tensors are copied in.
    """
    path = Path(path)
    if path.is_dir():
        config_file, weights = _resolve_qformer(path)
        config = config or SubjectEncoderConfig.from_json(config_file)
    elif path.is_file():
        weights, config = path, config or SubjectEncoderConfig()
    else:
        raise FileNotFoundError(f"subject encoder not found: {path}")
    state_dict = read_state_dict(weights)
    if any(k.startswith("blip.") for k in state_dict):
        state_dict = lavis_to_diffusers(state_dict)
    state_dict.pop("embeddings.position_ids", None)  # a saved arange; positions are computed instead
    with torch.device("meta"):  # no time spent initialising weights that are replaced next
        model = SubjectEncoderModel(config, operations, dtype)
    load_strict(model, state_dict, weights, device, progress)
    return SubjectEncoder(model, name=path.name)
