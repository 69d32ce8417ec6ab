"""BLIP-2 Q-Former in multimodal mode, plus BLIP-Diffusion's projection layer.

The learned query tokens and the BERT-embedded subject text attend to each other
(bidirectionally); only the queries cross-attend to the image tokens. BERT-style
post-LayerNorm blocks, parameter names as in the released diffusers `qformer/`
checkpoint (`embeddings.*`, `encoder.layer.{i}.*`, `proj_layer.*`).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import QFormerConfig
from .layers import activation, attention, layer_norm, norm_layer, quick_gelu

# BERT's additive mask value for padded text tokens (not -inf: kept for parity).
MASKED = -10000.0


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig, operations, dtype=None, device=None):
        super().__init__()
        self.word_embeddings = operations.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.position_embeddings = operations.Embedding(
            cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, device=device
        )
        self.LayerNorm = norm_layer(operations, cfg.hidden_size, cfg.layer_norm_eps, device)

    def forward(self, input_ids: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Queries get no position embedding but share the LayerNorm with the text."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = torch.cat([queries.to(text).expand(input_ids.shape[0], -1, -1), text], dim=1)
        return layer_norm(self.LayerNorm, x)


class SelfOutput(nn.Module):
    """dense -> residual -> LayerNorm (BERT's post-LN)."""

    def __init__(self, cfg: QFormerConfig, in_dim: int, operations, dtype=None, device=None):
        super().__init__()
        self.dense = operations.Linear(in_dim, cfg.hidden_size, dtype=dtype, device=device)
        self.LayerNorm = norm_layer(operations, cfg.hidden_size, cfg.layer_norm_eps, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return layer_norm(self.LayerNorm, self.dense(x) + residual)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_dim: int, operations, dtype=None, device=None):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = operations.Linear(cfg.hidden_size, cfg.hidden_size, dtype=dtype, device=device)
        self.key = operations.Linear(kv_dim, cfg.hidden_size, dtype=dtype, device=device)
        self.value = operations.Linear(kv_dim, cfg.hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return attention(self.query(x), self.key(context), self.value(context), self.heads, mask)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_dim: int, operations, dtype=None, device=None):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, kv_dim, operations, dtype, device)
        self.output = SelfOutput(cfg, cfg.hidden_size, operations, dtype, device)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.attention(x, context, mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig, operations, dtype=None, device=None):
        super().__init__()
        self.dense = operations.Linear(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, device=device)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int, operations, dtype=None, device=None):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size, operations, dtype, device)
        if index % cfg.cross_attention_frequency == 0:
            self.crossattention = Attention(cfg, cfg.encoder_hidden_size, operations, dtype, device)
        else:
            self.crossattention = None
        # Separate feed-forwards: `intermediate`/`output` for the text, `*_query` for the queries.
        self.intermediate = Intermediate(cfg, operations, dtype, device)
        self.output = SelfOutput(cfg, cfg.intermediate_size, operations, dtype, device)
        self.intermediate_query = Intermediate(cfg, operations, dtype, device)
        self.output_query = SelfOutput(cfg, cfg.intermediate_size, operations, dtype, device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor, num_queries: int) -> torch.Tensor:
        x = self.attention(x, x, mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        if self.crossattention is not None:
            queries = self.crossattention(queries, image)
        queries = self.output_query(self.intermediate_query(queries), queries)
        text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class ProjLayer(nn.Module):
    """Pre-LayerNorm residual MLP mapping query outputs to CLIP-space context embeddings."""

    def __init__(self, dim: int, hidden_dim: int, eps: float, operations, dtype=None, device=None):
        super().__init__()
        self.LayerNorm = norm_layer(operations, dim, eps, device)
        self.dense1 = operations.Linear(dim, hidden_dim, dtype=dtype, device=device)
        self.dense2 = operations.Linear(hidden_dim, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dense2(quick_gelu(self.dense1(layer_norm(self.LayerNorm, x))))


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, operations, dtype=None, device=None):
        super().__init__()
        self.layer = nn.ModuleList(
            QFormerLayer(cfg, i, operations, dtype, device) for i in range(cfg.num_hidden_layers)
        )

    def forward(self, x, mask, image, num_queries):
        for layer in self.layer:
            x = layer(x, mask, image, num_queries)
        return x


def text_attention_mask(text_mask: torch.Tensor, num_queries: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 0/1 text padding mask -> additive [B, 1, 1, Q+L] mask (queries always visible)."""
    keep = torch.cat([text_mask.new_ones(text_mask.shape[0], num_queries), text_mask], dim=1)
    return ((1.0 - keep.to(dtype)) * MASKED)[:, None, None, :]
