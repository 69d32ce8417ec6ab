"""Subject-driven editing: prompt-to-prompt attention control (AttentionRefine + LocalBlend).

An edit samples two rows from the same start: the source prompt "a {source} {prompt}" (plain CLIP)
and the target prompt, whose text gets the 16 subject vectors at position 2. While sampling,
the conditional target row borrows attention probabilities from the conditional source row:

- cross-attention, on the first `cross_replace` share of the UNet calls: every target key that
  has a counterpart in the source prompt (a global alignment of the two token sequences) takes
  the source's probabilities for that key; keys without one keep their own;
- self-attention, on the first `self_replace` share, in the coarse layers only: the source's;
- LocalBlend, after every sampler step: where the source row's accumulated attention to the
  source word is weak, the target latent is reset to the source latent.

Everything here works on token-id lists and probability tensors, so the ComfyUI nodes and the
tests share it. Numbers follow the original (LAVIS BLIP-Diffusion, whose editing code descends
from Google's prompt-to-prompt); `tests/parity/test_editing_parity.py` checks them against it.

Placeholder layouts of the target row:
- `lavis`: the original's. Its target text holds 16 "sks" words after "a", which remain real
  tokens after the 16 subject vectors ([BOS, a, vectors x16, sks x16, target, ...]), and its
  token mapper is computed on that text but applied to the model's keys: from position 2 on,
  each entry is 16 keys early.
- `none`: no placeholder words, and the mapper is computed on the model's keys, the subject
  vectors being keys that no source token matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .prompt import CTX_BEGIN_POS, MAX_LENGTH, NUM_QUERY_TOKENS

Placeholder = Literal["lavis", "none"]
PLACEHOLDERS: tuple[Placeholder, ...] = ("lavis", "none")
PLACEHOLDER_WORD = "sks"

# Global alignment scores of the original: a gap costs nothing, so the alignment is a longest
# common subsequence and a mismatched pair is never aligned.
_MATCH, _MISMATCH, _GAP = 1, -1, 0
# Traceback moves, in the order the original prefers them when scores tie.
_TARGET_ONLY, _SOURCE_ONLY, _PAIR = 1, 2, 3


def edit_prompts(source_subject: str, target_subject: str, prompt: str, placeholder: Placeholder) -> tuple[str, str]:
    """The source prompt and the target prompt's text (the subject vectors go in at CTX_BEGIN_POS).

    Neither is repeated (unlike generation's prompt amplification), as in the original's edit."""
    _check_placeholder(placeholder)
    words = [PLACEHOLDER_WORD] * NUM_QUERY_TOKENS if placeholder == "lavis" else []
    return f"a {source_subject} {prompt}", " ".join(["a", *words, target_subject, prompt])


def align_tokens(source: Sequence[int | None], target: Sequence[int | None]) -> list[int]:
    """For each target entry, the index of the source entry aligned with it, or -1.

    Needleman-Wunsch with the original's scores and tie order (a target-only step first, then a
    source-only step, then a pair), so that among equally good alignments the same one wins.
    `None` entries (subject vectors) match nothing."""
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[_TARGET_ONLY] * (m + 1)] + [[_SOURCE_ONLY] + [0] * m for _ in range(n)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            target_only = score[i][j - 1] + _GAP
            source_only = score[i - 1][j] + _GAP
            same = source[i - 1] is not None and source[i - 1] == target[j - 1]
            pair = score[i - 1][j - 1] + (_MATCH if same else _MISMATCH)
            best = max(target_only, source_only, pair)
            score[i][j] = best
            move[i][j] = _TARGET_ONLY if best == target_only else _SOURCE_ONLY if best == source_only else _PAIR
    aligned = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        step = move[i][j]
        if step == _PAIR:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif step == _TARGET_ONLY:
            j -= 1
        else:
            i -= 1
    return aligned


def refinement_mapper(
    source_ids: Sequence[int], target_ids: Sequence[int], placeholder: Placeholder, length: int = MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key of the model's target row: the source key it borrows attention from, and whether it does.

    source_ids, target_ids: the two prompts' token ids with BOS and EOS, unpadded (for `none`, the
    target as the model holds it: at most length - 16 ids). Returns `mapper` (int64 [length], -1
    where nothing is borrowed) and `alphas` (float32 [length], 1 where the source's probabilities
    are taken). Keys past the target's EOS (padding) borrow from the source key with the same index."""
    _check_placeholder(placeholder)
    if placeholder == "lavis":
        keys: list[int | None] = list(target_ids)
    else:
        keys = [*target_ids[:CTX_BEGIN_POS], *([None] * NUM_QUERY_TOKENS), *target_ids[CTX_BEGIN_POS:]]
    for name, seq in (("source", source_ids), ("target", keys)):
        if len(seq) > length:
            raise ValueError(f"the {name} prompt takes {len(seq)} keys; at most {length} fit")
    aligned = align_tokens(list(source_ids), keys)
    mapper = torch.cat([torch.tensor(aligned, dtype=torch.int64), torch.arange(len(keys), length)])
    alphas = torch.ones(length)
    alphas[: len(keys)] = (mapper[: len(keys)] >= 0).float()
    return mapper, alphas


def word_positions(prompt_ids: Sequence[int], word_ids: Sequence[int]) -> list[int]:
    """Key positions of every occurrence of a word's tokens in a plain-CLIP prompt (ids with BOS).

    Matching token ids rather than space-separated words also finds a word followed by punctuation
    ("dog,"), written in capitals, or made of several words ("teddy bear"). The original compares
    space-separated words as strings and misses these; when it finds no word at all, its LocalBlend
    mask is empty and every step resets the target row to the source row. An empty list here means
    the word is not in the prompt."""
    if not word_ids:
        raise ValueError("the word has no tokens")
    k = len(word_ids)
    found: set[int] = set()
    for start in range(len(prompt_ids) - k + 1):
        if list(prompt_ids[start : start + k]) == list(word_ids):
            found.update(range(start, start + k))
    return sorted(found)


@dataclass(frozen=True)
class ReplaceSchedule:
    """Which UNet calls of a run are edited: calls [0, cross_calls) refine cross-attention and
    calls [0, self_calls) replace self-attention. Calls, not sampler steps: PNDM's first step
    takes two calls, so an N-step PNDM run makes N + 1 of them."""

    cross_calls: int
    self_calls: int

    def refines_cross(self, call: int) -> bool:
        return call < self.cross_calls

    def replaces_self(self, call: int) -> bool:
        return call < self.self_calls


def replace_schedule(steps: int, cross_replace: float = 0.8, self_replace: float = 0.4) -> ReplaceSchedule:
    """The original's rounding: int(cross_replace * (steps + 1)) and int(self_replace * steps) calls."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    for name, value in (("cross_replace", cross_replace), ("self_replace", self_replace)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return ReplaceSchedule(int(cross_replace * (steps + 1)), int(self_replace * steps))


def _coarse_tokens(latent_hw: tuple[int, int]) -> int:
    h, w = latent_hw
    if h % 4 or w % 4:
        raise ValueError(f"latent size {h}x{w} is not a multiple of 4 (image size not a multiple of 32)")
    return (h // 4) * (w // 4)


def replaces_self_layer(tokens: int, latent_hw: tuple[int, int]) -> bool:
    """Self-attention is replaced only in layers at latent/4 resolution or coarser: at 512x512 the
    original's limit of 256 tokens (the 16x16 and 8x8 layers); the same layers at other sizes."""
    return tokens <= _coarse_tokens(latent_hw)


def is_blend_layer(query_tokens: int, latent_hw: tuple[int, int]) -> bool:
    """LocalBlend reads the cross-attention layers at latent/4 resolution: in SD-1.5 the two of the
    third down level and the three of the second up level (the original's down_cross[2:4] +
    up_cross[:3], which it reshapes to 16x16 and so works only at 512x512)."""
    return query_tokens == _coarse_tokens(latent_hw)


def edits_layer(is_cross: bool, call: int, schedule: ReplaceSchedule, tokens: int, latent_hw: tuple[int, int]) -> bool:
    """Whether a layer with `tokens` spatial tokens changes the target row's probabilities at this
    call (elsewhere the attention can run through any fused kernel)."""
    if is_cross:
        return schedule.refines_cross(call)
    return schedule.replaces_self(call) and replaces_self_layer(tokens, latent_hw)


def refine_cross_attention(
    source: torch.Tensor, target: torch.Tensor, mapper: torch.Tensor, alphas: torch.Tensor
) -> torch.Tensor:
    """AttentionRefine on the conditional rows' cross-attention probabilities ([..., queries, keys]):
    aligned keys take the source's probability of their counterpart, the others (subject vectors,
    new words) keep the target's. Rows are not renormalised, as in the original."""
    alphas = alphas.to(device=target.device, dtype=target.dtype)
    borrowed = source[..., mapper.to(source.device).clamp(min=0)]
    return borrowed * alphas + target * (1 - alphas)


def edit_attention(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    is_cross: bool,
    call: int,
    schedule: ReplaceSchedule,
    mapper: torch.Tensor,
    alphas: torch.Tensor,
    latent_hw: tuple[int, int],
) -> torch.Tensor:
    """The conditional target row's attention probabilities ([heads, queries, keys]) after the edit,
    given the conditional source row's. The source row itself is never changed."""
    if not edits_layer(is_cross, call, schedule, target.shape[-2], latent_hw):  # queries: the layer's tokens
        return target
    if is_cross:
        return refine_cross_attention(source, target, mapper, alphas)
    return source.expand_as(target)


def blend_map(maps: Sequence[torch.Tensor], positions: Sequence[int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """The source word's attention map [h, w] that LocalBlend thresholds, scaled to a maximum of 1.

    maps: the conditional source row's cross-attention probabilities [heads, queries, keys] of every
    layer at latent/4 resolution, each summed over all UNet calls so far (the original keeps sums).
    Summed over the word's tokens, averaged over layers and heads, 3x3 max-pooled, resized (nearest)
    to the latent."""
    if not maps:
        raise ValueError("LocalBlend needs the cross-attention maps of the latent/4 layers")
    if not positions:
        raise ValueError("LocalBlend needs the source word's token positions")
    h, w = latent_hw
    tokens = _coarse_tokens(latent_hw)
    weights = torch.zeros(maps[0].shape[-1], dtype=maps[0].dtype, device=maps[0].device)
    weights[list(positions)] = 1
    per_head = []
    for m in maps:
        if m.shape[-2] != tokens:
            raise ValueError(f"a map with {m.shape[-2]} queries is not at latent/4 resolution ({tokens})")
        per_head.append((m * weights).sum(-1).reshape(-1, 1, h // 4, w // 4))
    word = torch.cat(per_head)[None].mean(1)  # [1, 1, h/4, w/4]
    pooled = F.max_pool2d(word, (3, 3), (1, 1), padding=(1, 1))
    resized = F.interpolate(pooled, size=(h, w))
    return (resized / resized.max())[0, 0]


def blend_mask(
    maps: Sequence[torch.Tensor], positions: Sequence[int], latent_hw: tuple[int, int], threshold: float
) -> torch.Tensor:
    """Where the edit is kept ([h, w] bool): the source word's map above the threshold."""
    return blend_map(maps, positions, latent_hw) > threshold


def blend_latents(source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target latent after LocalBlend: the source latent outside the mask, the target's inside."""
    return source + mask.to(source.dtype) * (target - source)


def _check_placeholder(placeholder: str) -> None:
    if placeholder not in PLACEHOLDERS:
        raise ValueError(f"placeholder must be one of {PLACEHOLDERS}, got {placeholder!r}")
