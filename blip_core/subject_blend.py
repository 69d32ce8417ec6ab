"""Weighted averages of subject views and blends of two subjects (LAVIS `forward_ctx_embeddings`).

LAVIS combines several subject embeddings as a weighted sum whose weights add up to 1
(equal weights by default); subject interpolation is that sum with weights [1 - ratio, ratio].
Both are linear, so blending two subjects and then averaging their views gives the same
embeddings as averaging first and blending after.
"""

from __future__ import annotations

import math

import torch

from .messages import quoted
from .subject import Subject


def parse_weights(text: str, count: int) -> torch.Tensor | None:
    """Comma-separated weights, one per view, scaled to sum 1; None for an empty text (equal weights)."""
    if not text.strip():
        return None
    parts = text.split(",")
    if len(parts) != count:
        raise ValueError(f"expected {count} weights (one per subject image), got {len(parts)}: {quoted(text)}")
    try:
        weights = [float(w) for w in parts]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers such as '2, 1', got {quoted(text)}") from None
    if any(not math.isfinite(w) or w < 0 for w in weights) or max(weights) <= 0:
        raise ValueError(f"weights must be finite, zero or positive, with a positive sum; got {quoted(text)}")
    # Scaled by the largest first: the sum of two weights near the float maximum would overflow to infinity.
    largest = max(weights)
    scaled = [w / largest for w in weights]
    return torch.tensor([w / sum(scaled) for w in scaled], dtype=torch.float32)


def average_views(embeds: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N,16,D] -> [1,16,D]: the mean of the views, or their sum weighted by `weights` [N] (summing to 1)."""
    if weights is None:
        return embeds.mean(dim=0, keepdim=True)
    return (weights.to(embeds).view(-1, 1, 1) * embeds).sum(dim=0, keepdim=True)


def _describe(subject: Subject) -> str:
    """How a subject reads inside a blend description; blends of blends nest in parentheses."""
    return f"({subject.metadata['blend']})" if "blend" in subject.metadata else subject.category


def blend(a: Subject, b: Subject, ratio: float, category: str = "") -> Subject:
    """(1 - ratio) * a + ratio * b, view by view; ratio 0 gives a's embeddings and 1 gives b's, exactly.

    The two subjects need the same number of views, or one of them a single view (used for
    every view of the other). The result has `category`, or a's category when it is empty.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be between 0 and 1, got {ratio}")
    na, nb = a.embeds.shape[0], b.embeds.shape[0]
    if a.embeds.shape[1:] != b.embeds.shape[1:]:
        raise ValueError(
            f"the subjects have embeddings of different shapes {tuple(a.embeds.shape[1:])} and "
            f"{tuple(b.embeds.shape[1:])}: they come from different subject encoders"
        )
    if na != nb and 1 not in (na, nb):
        raise ValueError(
            f"subject_a has {na} views and subject_b {nb}: blending needs the same number of views, "
            "or a single view on one side"
        )
    # (1 - r) * a + r * b rather than a + r * (b - a): the endpoints then reproduce a and b bit for bit.
    embeds = (1.0 - ratio) * a.embeds.float() + ratio * b.embeds.float()
    # Provenance the blend still shares with both inputs (e.g. the encoder) stays; per-input facts go.
    metadata = {k: v for k, v in a.metadata.items() if b.metadata.get(k) == v}
    metadata["blend"] = f"{1.0 - ratio:g} x {_describe(a)} + {ratio:g} x {_describe(b)}"
    return Subject(embeds, category.strip() or a.category, metadata)
