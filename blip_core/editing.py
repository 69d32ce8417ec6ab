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

import hashlib
import json
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .messages import quoted
from .prompt import CTX_BEGIN_POS, MAX_LENGTH, NUM_QUERY_TOKENS
from .sampling import StepHook

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
    original's limit of 256 tokens (the 16x16 and 8x8 layers); the same layers at other sizes. The UNet
    halves odd sizes upwards, so a latent that is not a multiple of 4 has ceil(h/4) x ceil(w/4) there."""
    h, w = latent_hw
    return tokens <= math.ceil(h / 4) * math.ceil(w / 4)


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


# --- an edit's token layout ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EditSpec:
    """What the attention control of an edit needs, fixed by the two prompts' tokens.

    mapper / alphas: per key of the model's target row (refinement_mapper); blend_positions: the source
    word's keys in the source row (LocalBlend's word); key: names this token layout, so that the edit's
    CONDITIONING and its patched MODEL can be checked to belong together."""

    placeholder: Placeholder
    source_prompt: str
    target_text: str
    mapper: torch.Tensor
    alphas: torch.Tensor
    blend_positions: tuple[int, ...]
    key: str


def edit_spec(
    source_ids: Sequence[int | None],
    target_ids: Sequence[int | None],
    word_ids: Sequence[int | None],
    placeholder: Placeholder,
    source_prompt: str,
    target_text: str,
    source_subject: str,
) -> EditSpec:
    """The EditSpec of two tokenized prompts (ids with BOS and EOS; None for a token that is an embedding).

    source_ids: the source prompt; target_ids: the target text as tokenized (without the subject
    vectors); word_ids: the source subject's tokens. The target text keeps what the model holds: for
    `lavis` the original computes its mapper on the whole text and fails beyond 77 tokens (a clear error
    here), for `none` the mapper follows the model's keys, whose text is cut after 59 tokens."""
    _check_placeholder(placeholder)
    if len(source_ids) > MAX_LENGTH:
        raise ValueError(
            f"prompt: the source prompt {quoted(source_prompt)} takes {len(source_ids)} tokens; an edit needs it in "
            f"one CLIP chunk of {MAX_LENGTH} (with the start and end tokens): shorten the prompt"
        )
    if placeholder == "lavis" and len(target_ids) > MAX_LENGTH:
        raise ValueError(
            f"prompt: the target text {quoted(target_text)} takes {len(target_ids)} tokens, {NUM_QUERY_TOKENS} of them "
            f"the 'sks' placeholders; at most {MAX_LENGTH} fit (the original fails here too): shorten the prompt, "
            "or use placeholder 'none'"
        )
    held = MAX_LENGTH - NUM_QUERY_TOKENS  # the text the model holds beside the subject vectors, with BOS and EOS
    if placeholder == "none" and len(target_ids) > held:
        target_ids = [*target_ids[: held - 1], target_ids[-1]]
    positions = word_positions(source_ids, word_ids) if any(t is not None for t in word_ids) else []
    if not positions:
        raise ValueError(
            f"source_subject: {quoted(source_subject)} is not a word of the source prompt {quoted(source_prompt)} "
            "(its tokens do not occur there); the edit replaces that word's subject: name the subject the source "
            "shows, e.g. 'dog'"
        )
    mapper, alphas = refinement_mapper(source_ids, target_ids, placeholder)
    layout = [placeholder, list(source_ids), list(target_ids), positions]
    key = hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]
    return EditSpec(placeholder, source_prompt, target_text, mapper, alphas, tuple(positions), key)


# --- one sampling run of an edit ---------------------------------------------------------------------

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EditSettings:
    """The user's settings of the attention control (the original's defaults)."""

    cross_replace: float = 0.8
    self_replace: float = 0.4
    local_blend: bool = True
    blend_threshold: float = 0.3


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, in float32: q [queries, heads*d], k [keys, heads*d] -> [heads, q, k]."""
    d = q.shape[-1] // heads
    qh = q.reshape(q.shape[0], heads, d).transpose(0, 1).float()
    kh = k.reshape(k.shape[0], heads, d).transpose(0, 1).float()
    return torch.softmax(qh @ kh.transpose(1, 2) * d**-0.5, dim=-1)


def weighted_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs [heads, q, k] times v [keys, heads*d] -> [q, heads*d] in v's dtype (heads side by side)."""
    heads = probs.shape[0]
    vh = v.reshape(v.shape[0], heads, -1).transpose(0, 1).float()
    return (probs @ vh).transpose(0, 1).reshape(probs.shape[1], -1).to(v.dtype)


@dataclass(eq=False)
class EditRun:
    """The state of one sampling run: which UNet call it is, and the source word's cross-attention summed over
    every call so far (LocalBlend's maps). Made when sampling starts, so nothing carries over between runs.

    Rows: the sampler's batch holds the source (row 0) and the target (row 1); the UNet sees them once per
    CFG half. Only the conditional target row's attention is edited, from the conditional source row's.
    `source_conditional`: the source row follows its conditional prediction only (a real photo's inversion
    is reproduced that way, as the original does)."""

    spec: EditSpec
    settings: EditSettings
    steps: int
    latent_hw: tuple[int, int]
    source_conditional: bool = False
    call: int = 0
    exact_blend: bool = False  # the sampler blends the latents between steps (else: the x0 prediction)
    maps: dict[Hashable, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.schedule = replace_schedule(self.steps, self.settings.cross_replace, self.settings.self_replace)
        h, w = self.latent_hw
        if self.settings.local_blend and (h % 4 or w % 4):
            raise ValueError(
                f"local_blend: LocalBlend needs an image whose width and height are multiples of 32; this one is "
                f"{8 * w}x{8 * h} (latent {w}x{h}): crop or resize it, or turn local_blend off"
            )

    def attend(
        self,
        layer: Hashable,
        is_cross: bool,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        heads: int,
        conditional: Sequence[bool],
        out: torch.Tensor,
        attention: Attention,
    ) -> torch.Tensor:
        """One attention layer's output [B, queries, heads*d] after the edit, given the unedited `out`.

        q, k, v: the layer's projections for the whole batch: one chunk of two rows (source, target) per
        CFG half, `conditional` telling which chunk is conditional. `attention(q, k, v)` is the fused
        attention (no probabilities) for the self-attention replace, which is exact algebra:
        softmax(q_src k_src^T) v_tgt. Probabilities are computed only where they are edited or stored."""
        tokens = q.shape[1]
        edit = edits_layer(is_cross, self.call, self.schedule, tokens, self.latent_hw)
        store = is_cross and self.settings.local_blend and is_blend_layer(tokens, self.latent_hw)
        if not (edit or store) or True not in conditional:
            return out
        rows = q.shape[0] // len(conditional)
        if rows != 2:
            raise ValueError(f"an edit samples two rows (source, target) per CFG half; this batch has {rows}")
        src = 2 * list(conditional).index(True)
        tgt = src + 1
        if not is_cross:  # self-attention replace: the target row attends as the source row does
            out[tgt] = attention(q[src : src + 1], k[src : src + 1], v[tgt : tgt + 1])[0]
            return out
        # ComfyUI repeats a conditioning's tokens to batch it with a longer negative (77 -> 154 ...): the copies
        # share each key's probability, so summing them gives the 77 keys the mapper and the blend address.
        keys = k.shape[1]
        if keys % MAX_LENGTH:
            raise ValueError(f"an edit's conditioning has {MAX_LENGTH} tokens per row; this layer sees {keys} keys")
        copies = keys // MAX_LENGTH

        def probs(row: int) -> torch.Tensor:
            p = attention_probs(q[row], k[row], heads)
            return p.reshape(*p.shape[:2], copies, MAX_LENGTH).sum(2) if copies > 1 else p

        source = probs(src)
        if store:
            self.maps[layer] = source if layer not in self.maps else self.maps[layer] + source
        if edit:
            refined = refine_cross_attention(source, probs(tgt), self.spec.mapper, self.spec.alphas)
            out[tgt] = weighted_values(refined, v[tgt, :MAX_LENGTH])
        return out

    def blend_map(self) -> torch.Tensor:
        """LocalBlend's normalised map [h, w] of the calls so far."""
        if not self.maps:
            raise ValueError(
                "local_blend: this model has no cross-attention layer at a quarter of the latent size, where "
                "LocalBlend reads the source word's attention: turn local_blend off"
            )
        return blend_map(list(self.maps.values()), self.spec.blend_positions, self.latent_hw)

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        """LocalBlend on a [2, C, h, w] batch (source, target) of latents or x0 predictions: the target keeps
        its own values where the source word's attention is strong, the source's elsewhere."""
        mask = (self.blend_map() > self.settings.blend_threshold).to(x.device)
        return torch.stack([x[0], blend_latents(x[0], x[1], mask)])

    def claim_exact_blend(self) -> StepHook | None:
        """Called by a sampler that runs LocalBlend between its steps (the pack's PLMS and DDIM): the hook to
        run after each model call's update, or None when the blend is off."""
        self.exact_blend = True
        return self.blend if self.settings.local_blend else None

    def blends_x0(self) -> bool:
        """Whether LocalBlend falls back to the x0 prediction (a sampler that did not claim the blend)."""
        return self.settings.local_blend and not self.exact_blend

    def end_call(self) -> None:
        self.call += 1
