"""BLIP-2 vision tower: a CLIP ViT (ViT-L/14 cut to 23 layers for BLIP-Diffusion).

Parameter names follow the released diffusers `qformer/` checkpoint
(`visual_encoder.embeddings.*`, `visual_encoder.encoder.layers.{i}.*`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .layers import activation, attention, layer_norm, norm_layer


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig, operations, dtype=None, device=None):
        super().__init__()
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.empty(1, 1, cfg.hidden_size, dtype=dtype, device=device))
        self.position_embedding = nn.Parameter(
            torch.empty(1, num_positions, cfg.hidden_size, dtype=dtype, device=device)
        )
        self.patch_embedding = operations.Conv2d(
            3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False, dtype=dtype, device=device
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches).expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, operations, dtype=None, device=None):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.qkv = operations.Linear(
            cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias, dtype=dtype, device=device
        )
        self.projection = operations.Linear(cfg.hidden_size, cfg.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.projection(attention(q, k, v, self.heads))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, operations, dtype=None, device=None):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = operations.Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, device=device)
        self.fc2 = operations.Linear(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: VisionConfig, operations, dtype=None, device=None):
        super().__init__()
        self.layer_norm1 = norm_layer(operations, cfg.hidden_size, cfg.layer_norm_eps, device)
        self.self_attn = VisionAttention(cfg, operations, dtype, device)
        self.layer_norm2 = norm_layer(operations, cfg.hidden_size, cfg.layer_norm_eps, device)
        self.mlp = VisionMLP(cfg, operations, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(layer_norm(self.layer_norm1, x))
        return x + self.mlp(layer_norm(self.layer_norm2, x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, operations, dtype=None, device=None):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, operations, dtype, device) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """pixel_values [B,3,224,224] -> image tokens [B,257,hidden] (post-LayerNorm on every token)."""

    def __init__(self, cfg: VisionConfig, operations=nn, dtype=None, device=None):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg, operations, dtype, device)
        self.pre_layernorm = norm_layer(operations, cfg.hidden_size, cfg.layer_norm_eps, device)
        self.encoder = VisionEncoder(cfg, operations, dtype, device)
        self.post_layernorm = norm_layer(operations, cfg.hidden_size, cfg.layer_norm_eps, device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = layer_norm(self.pre_layernorm, self.embeddings(pixel_values))
        return layer_norm(self.post_layernorm, self.encoder(x))
