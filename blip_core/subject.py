"""An encoded subject, checked once where it is made, whatever made it (an encoder, a file, a blend)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .prompt import NUM_QUERY_TOKENS

# A category is a word or two ("dog", "teddy bear"). The BERT text beside the 16 queries holds a few
# hundred tokens at most, and the prompt keeps 59 CLIP tokens, so a longer one is a mistake or hostile.
MAX_CATEGORY_CHARS = 100
# Several photos of one subject are a handful; the per-latent prompt encodes one row per view.
MAX_VIEWS = 256


def check_category(category: str, name: str = "subject") -> str:
    """The category without surrounding spaces, or a ValueError whose message starts with `name`."""
    text = category.strip()
    if not text:
        raise ValueError(f"{name}: the category is empty; name what the image shows, e.g. 'dog'")
    if len(text) > MAX_CATEGORY_CHARS:
        raise ValueError(
            f"{name}: a category of {len(text)} characters; expected a word or two, e.g. 'dog' "
            f"(at most {MAX_CATEGORY_CHARS} characters)"
        )
    return text


def check_embeds(embeds: torch.Tensor, source: str = "subject") -> None:
    """Subject embeddings are floats [views >= 1, 16, width] with no NaN or infinity: anything else would
    make a black or meaningless picture without an error."""
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        kind = embeds.dtype if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{source}: subject embeddings must be floating point, got {kind}")
    if embeds.ndim != 3 or not 1 <= embeds.shape[0] <= MAX_VIEWS or embeds.shape[1] != NUM_QUERY_TOKENS:
        raise ValueError(
            f"{source}: subject embeddings must have shape [views, {NUM_QUERY_TOKENS}, width] with 1 to "
            f"{MAX_VIEWS} views, got {tuple(embeds.shape)}"
        )
    if not 1 <= embeds.shape[2] <= 8192:
        raise ValueError(f"{source}: subject embeddings {embeds.shape[2]} wide; CLIP token embeddings are 768 wide")
    if not torch.isfinite(embeds).all():
        raise ValueError(f"{source}: subject embeddings hold NaN or infinite values")


@dataclass
class Subject:
    """Context embeddings [views, 16, width] (one row per view), the category word and provenance strings."""

    embeds: torch.Tensor
    category: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_embeds(self.embeds)
        self.category = check_category(self.category)
