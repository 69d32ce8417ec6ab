"""The multimodal prompt: subject embeddings spliced into the prompt, encoded by ComfyUI's own CLIP.

ComfyUI's SD-1 CLIP accepts tensors inside the token list and inserts them into the
token-embedding sequence before the position embeddings are added: exactly what
BLIP-Diffusion's context-aware CLIP does. The result is a native CONDITIONING that the
stock KSampler, ControlNet and conditioning nodes accept.
"""

from __future__ import annotations

import torch

from ..blip_core.prompt import build_prompt, splice_context
from ..blip_core.subject_blend import average_views, parse_weights
from . import compat
from .api import CATEGORY, SubjectType, combo_error, io, number_error

MULTI_IMAGE = ("average", "per latent")


def _text_entries(chunks: list[list[tuple]], eos) -> list[tuple]:
    """The prompt's entries across ComfyUI's 77-token chunks, without BOS/EOS/padding."""
    entries = []
    for chunk in chunks:
        for entry in chunk[1:]:
            if isinstance(entry[0], int) and entry[0] == eos:
                break
            entries.append(entry[:2])
    return entries


def _special_tokens(clip) -> tuple:
    """CLIP-L's (BOS, EOS, padding) token ids, as ComfyUI's tokenizer writes them."""
    empty = compat.clip_l_tokens(clip, "")[0]
    return empty[0][0], empty[1][0], empty[-1][0]


def token_ids(clip, text: str) -> list[int | None]:
    """`text`'s CLIP-L token ids with BOS and EOS, unpadded, across chunks; None for an embedding (a tensor)."""
    bos, eos, _ = _special_tokens(clip)
    entries = _text_entries(compat.clip_l_tokens(clip, text), eos)
    return [bos, *(t if isinstance(t, int) else None for t, _ in entries), eos]


def fused_tokens(clip, text: str, context: torch.Tensor) -> list[list[tuple]]:
    """CLIP-L tokens of one chunk: BOS, "a", the context rows, the rest of the text, EOS, padding."""
    bos, eos, pad = _special_tokens(clip)
    entries = _text_entries(compat.clip_l_tokens(clip, text), eos)
    ctx = [(row, 1.0) for row in context]
    return [splice_context(entries, ctx, (bos, 1.0), (eos, 1.0), (pad, 1.0))]


def merge_batch(conditionings: list[list]) -> list:
    """N single-image CONDITIONINGs of equal structure -> one whose tensors have batch N."""
    merged = []
    for parts in zip(*conditionings):
        cond = torch.cat([p[0] for p in parts])
        extra = dict(parts[0][1])
        if extra.get("pooled_output") is not None:
            extra["pooled_output"] = torch.cat([p[1]["pooled_output"] for p in parts])
        merged.append([cond, extra])
    return merged


def encode_fused(clip, text: str, embeds: torch.Tensor) -> list:
    """CONDITIONING with one batch row per row of `embeds` [N,16,D]."""
    encoders = compat.clip_encoders(clip)
    if encoders != ["l"]:
        raise ValueError(f"clip: BLIP-Diffusion needs an SD-1.5 CLIP (CLIP-L only); this CLIP has encoders {encoders}")
    width = compat.clip_l_width(clip)
    if embeds.shape[-1] != width:
        raise ValueError(
            f"subject: its embeddings are {embeds.shape[-1]} wide but this CLIP's tokens are {width} "
            "wide; use the CLIP of the same BLIP-Diffusion model"
        )
    return merge_batch([compat.encode_clip_l_tokens(clip, fused_tokens(clip, text, row)) for row in embeds])


class BlipDiffusionMultimodalPromptFuse(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionMultimodalPromptFuse",
            display_name="BLIP-Diffusion Multimodal Prompt",
            category=f"{CATEGORY}/conditioning",
            description='Builds BLIP-Diffusion\'s prompt "a <target> <prompt>" (repeated), inserts the subject '
            'embeddings after "a" and encodes it with CLIP into a regular CONDITIONING.',
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the BLIP-Diffusion model (from the BLIP-Diffusion Loader)."),
                SubjectType.Input(
                    "subject", tooltip="From the BLIP-Diffusion Subject Encoder (or a loaded/blended subject)."
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="swimming underwater",
                    tooltip='What the subject does or where it is; the template adds "a <target>" in front.',
                ),
                io.String.Input(
                    "target_subject",
                    default="",
                    tooltip="The category to render, e.g. 'tiger' for a tiger that looks like the dog. "
                    "Empty: the subject's own category.",
                ),
                io.Float.Input(
                    "prompt_strength",
                    default=1.0,
                    min=0.0,
                    max=5.0,
                    step=0.05,
                    tooltip="Repeats the text floor(strength x reps) times to amplify it (0 = no text). "
                    "Only the first 59 text tokens fit.",
                ),
                io.Int.Input(
                    "prompt_reps",
                    default=20,
                    min=0,
                    max=100,
                    tooltip='Base number of repetitions of "a <target> <prompt>".',
                ),
                io.Combo.Input(
                    "multi_image",
                    options=list(MULTI_IMAGE),
                    default="average",
                    tooltip="With several subject images: average them into one subject, or give image i to "
                    "latent i of the batch.",
                ),
                io.String.Input(
                    "image_weights",
                    default="",
                    optional=True,  # optional: older prompts lack it
                    tooltip="average only: one weight per subject image, comma-separated, e.g. '2, 1, 1' "
                    "(scaled to sum 1). Empty: equal weights.",
                ),
            ],
            outputs=[io.Conditioning.Output(tooltip="Positive conditioning for any sampler.")],
        )

    @classmethod
    def validate_inputs(cls, multi_image: str | None = None, prompt_strength: float | None = None):
        return (
            combo_error("multi_image", multi_image, MULTI_IMAGE)
            or number_error(cls, prompt_strength=prompt_strength)
            or True
        )

    @classmethod
    def execute(
        cls,
        clip,
        subject,
        prompt: str,
        target_subject: str,
        prompt_strength: float,
        prompt_reps: int,
        multi_image: str,
        image_weights: str = "",
    ) -> io.NodeOutput:
        target = target_subject.strip() or subject.category
        text = build_prompt(prompt, target, prompt_strength, prompt_reps)
        return io.NodeOutput(encode_fused(clip, text, subject_rows(subject.embeds, multi_image, image_weights)))


def subject_rows(embeds: torch.Tensor, multi_image: str, image_weights: str) -> torch.Tensor:
    """The subject rows to encode: one per latent, or the (weighted) average of the views."""
    if multi_image == "per latent":
        if image_weights.strip():
            raise ValueError("image_weights: weights apply to multi_image 'average' only; clear them for 'per latent'")
        return embeds
    try:
        weights = parse_weights(image_weights, embeds.shape[0])
    except ValueError as e:
        raise ValueError(f"image_weights: {e}") from None
    return average_views(embeds, weights)


NODES = [BlipDiffusionMultimodalPromptFuse]
