"""Small building blocks shared by the subject encoder and the text encoder.

Every module takes an `operations` namespace (default `torch.nn`) that provides
Linear / LayerNorm / Conv2d / Embedding, so ComfyUI can pass `comfy.ops.manual_cast`
and get its low-VRAM weight casting. LayerNorms always run in float32: BERT's eps of
1e-12 vanishes in half precision and the statistics overflow easily.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def layer_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply `norm` in float32 and return the input's dtype."""
    return norm(x.float()).to(x.dtype)


def norm_layer(operations, dim: int, eps: float, device=None) -> nn.Module:
    """A LayerNorm whose parameters stay float32 whatever the model's weight dtype."""
    return operations.LayerNorm(dim, eps=eps, device=device, dtype=torch.float32)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention on [B, L, heads*d] tensors."""
    b, lq, dim = q.shape
    d = dim // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, dim)
