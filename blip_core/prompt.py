"""BLIP-Diffusion's prompt template and token layout.

The conditional prompt is "a {target} {prompt}" repeated to amplify it, tokenized to
61 CLIP tokens (BOS + 59 text tokens + EOS, padded), and the 16 subject embeddings are
spliced in after BOS and "a": 2 + 16 + 59 = 77 positions, one CLIP chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

MAX_LENGTH = 77
NUM_QUERY_TOKENS = 16
CTX_BEGIN_POS = 2
TEXT_TOKENS = MAX_LENGTH - NUM_QUERY_TOKENS - 2  # 59: what fits beside the subject, BOS and EOS

T = TypeVar("T")


def build_prompt(prompt: str, target_subject: str, strength: float = 1.0, reps: int = 20) -> str:
    """`"a {target} {prompt}"` repeated floor(strength * reps) times, joined by ", ".

    Only the first TEXT_TOKENS tokens are ever used, and every word and every copy brings at least one, so the
    text is built no longer than what can matter: at most TEXT_TOKENS copies of a prompt cut after 4 x TEXT_TOKENS
    words (a margin that keeps weight groups such as "(word:1.2)" whole). For any ordinary prompt its first
    TEXT_TOKENS tokens are those of the full text; a 10,000-word prompt repeated 500 times costs what a short one
    does.
    """
    words = prompt.split()
    if len(words) > 4 * TEXT_TOKENS:
        prompt = " ".join(words[: 4 * TEXT_TOKENS])
    one = f"a {target_subject} {prompt.strip()}"
    return ", ".join([one] * min(int(strength * reps), TEXT_TOKENS))


def splice_context(
    text: Sequence[T],
    context: Sequence[T],
    bos: T,
    eos: T,
    pad: T,
    begin: int = CTX_BEGIN_POS,
    length: int = MAX_LENGTH,
) -> list[T]:
    """One chunk of `length` entries: BOS, text (truncated), EOS, padding, with `context` inserted at `begin`.

    `text` holds the prompt's tokens without BOS/EOS; entries may be ids or anything else
    (ComfyUI token tuples), so the reference encoder and the ComfyUI node share this layout.
    """
    room = length - len(context) - 2
    if room < begin - 1:
        raise ValueError(f"{len(context)} context entries leave no room in a {length}-token chunk")
    body = [bos, *text[:room], eos]
    body += [pad] * (length - len(context) - len(body))
    return body[:begin] + list(context) + body[begin:]
