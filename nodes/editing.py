"""Subject-driven editing: prompt-to-prompt attention control with LocalBlend, as the original BLIP-Diffusion edits.

An edit samples two rows from one start: the source prompt "a {source} {prompt}" (row 0) and the target
prompt with the subject (row 1). The Edit Prompt makes both as one two-row CONDITIONING, plus the token
layout the attention control needs (BLIPD_EDIT). Prompt-to-Prompt patches a MODEL with ComfyUI's attention
replace patches (the conditional target row borrows the source row's attention), sampling wrappers (a run's
state, made when it starts; one start for both rows; the model-call counter; LocalBlend on the x0
prediction for ComfyUI's samplers) and a post-CFG function (a real photo's source row follows its
conditional prediction). The pack's PLMS and DDIM samplers take LocalBlend over and run it between steps,
exactly where the original does (claim_step_hook).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..blip_core.editing import (
    PLACEHOLDERS,
    EditRun,
    EditSettings,
    EditSpec,
    edit_prompts,
    edit_spec,
)
from ..blip_core.messages import quoted
from ..blip_core.sampling import StepHook
from ..blip_core.subject import check_category
from ..blip_core.subject_blend import average_views
from . import compat
from .api import CATEGORY, EditType, SubjectType, combo_error, io, number_error
from .prompt import encode_fused, merge_batch, token_ids

EDIT_KEY = "blipd_edit"  # the edit's key in its CONDITIONING's entry, and its EditModel on the patched MODEL
RUN_KEY = "blipd_edit_run"  # the sampling run's EditRun in that run's transformer options
ROWS = 2  # source, target


@dataclass(frozen=True)
class EditModel:
    """What a patched MODEL carries: the edit's token layout and the user's settings."""

    spec: EditSpec
    settings: EditSettings


class BlipDiffusionEditPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionEditPrompt",
            display_name="BLIP-Diffusion Edit Prompt",
            category=f"{CATEGORY}/editing",
            description='Subject-driven editing, step 1: the source prompt "a <source_subject> <prompt>" (plain '
            "CLIP) and the target prompt (the subject's vectors, the target category, the same prompt) as one "
            "two-row CONDITIONING, plus the token layout BLIP-Diffusion Prompt-to-Prompt needs.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the BLIP-Diffusion model (from the BLIP-Diffusion Loader)."),
                SubjectType.Input(
                    "subject",
                    tooltip="The subject to put in (from the Subject Encoder, or a loaded subject). Several "
                    "views are averaged.",
                ),
                io.String.Input(
                    "source_subject",
                    default="dog",
                    tooltip="The word for what the source picture shows and the edit replaces, e.g. 'dog' (LocalBlend "
                    "keeps the edit where the source attends to this word).",
                ),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    default="on the grass",
                    tooltip="The rest of the source picture's description: the source prompt is \"a <source_subject> "
                    '<prompt>", the target "a <subject vectors> <target_subject> <prompt>" (not repeated).',
                ),
                io.String.Input(
                    "target_subject",
                    default="",
                    tooltip="The category the edit puts in, e.g. 'dog'. Empty: the subject's own category.",
                ),
                io.Combo.Input(
                    "placeholder",
                    options=list(PLACEHOLDERS),
                    default="lavis",
                    tooltip="lavis: the original's token layout (16 'sks' placeholder words after the subject "
                    "vectors, and its token mapping 16 positions early), to reproduce the original's edits. none: "
                    "no placeholders; every word borrows the attention of the same word.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    "conditioning",
                    tooltip="Two rows, source and target: the positive for a sampler with the Prompt-to-Prompt MODEL.",
                ),
                EditType.Output("edit", tooltip="The token layout: connect it to BLIP-Diffusion Prompt-to-Prompt."),
                io.Conditioning.Output(
                    "source",
                    tooltip="The source prompt alone (plain CLIP): the positive for the DDIM Inversion of a real "
                    "photo, which the original inverts with this prompt.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, placeholder: str | None = None):
        return combo_error("placeholder", placeholder, list(PLACEHOLDERS)) or True

    @classmethod
    def execute(
        cls, clip, subject, source_subject: str, prompt: str, target_subject: str, placeholder: str
    ) -> io.NodeOutput:
        target = check_category(target_subject, "target_subject") if target_subject.strip() else subject.category
        source_prompt, target_text = edit_prompts(source_subject.strip(), target, prompt.strip(), placeholder)
        if not source_subject.strip():
            raise ValueError(
                f"source_subject: empty, so the source prompt {quoted(source_prompt)} names nothing for the edit to "
                "replace; enter the word for what the source picture shows, e.g. 'dog'"
            )
        source_word = check_category(source_subject, "source_subject")
        spec = edit_spec(
            token_ids(clip, source_prompt),
            token_ids(clip, target_text),
            token_ids(clip, source_word)[1:-1],
            placeholder,
            source_prompt,
            target_text,
            source_word,
        )
        source = compat.encode_clip_l_tokens(clip, compat.clip_l_tokens(clip, source_prompt))
        target_row = encode_fused(clip, target_text, average_views(subject.embeds))
        conditioning = merge_batch([source, target_row])
        conditioning[0][1][EDIT_KEY] = spec.key
        return io.NodeOutput(conditioning, spec, source)


class BlipDiffusionPromptToPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionPromptToPrompt",
            display_name="BLIP-Diffusion Prompt-to-Prompt",
            category=f"{CATEGORY}/editing",
            description="Subject-driven editing, step 2: a MODEL whose target row (the Edit Prompt's row 1) takes the "
            "source row's attention (prompt-to-prompt), and keeps the edit where the source word is (LocalBlend). "
            "Sample it with the Edit Prompt's conditioning and a latent of batch 1: both rows start from it. Exact "
            "with the BLIP-Diffusion Sampler's pndm and reference_ddim, approximate with ComfyUI's samplers.",
            inputs=[
                io.Model.Input("model", tooltip="The BLIP-Diffusion UNet (LoRAs and other patches may come before)."),
                EditType.Input("edit", tooltip="From the BLIP-Diffusion Edit Prompt whose conditioning you sample."),
                io.Float.Input(
                    "cross_replace",
                    default=0.8,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Share of the model calls (from the first) in which the target's cross-attention takes "
                    "the source's for the words both prompts share: int(share x (steps + 1)) calls, as the original.",
                ),
                io.Float.Input(
                    "self_replace",
                    default=0.4,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Share of the model calls in which the target's self-attention is the source's, in the "
                    "coarse layers (a quarter of the latent size and below): int(share x steps) calls.",
                ),
                io.Boolean.Input(
                    "local_blend",
                    default=True,
                    tooltip="Keep the edit only where the source attends to source_subject; elsewhere the target is "
                    "the source. Needs a width and height that are multiples of 32.",
                ),
                io.Float.Input(
                    "blend_threshold",
                    default=0.3,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="LocalBlend keeps the edit where the source word's normalised attention exceeds this; "
                    "lower edits more pixels (virtual try-on: 0.15).",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The patched MODEL: for the sampler of the edit, not for other prompts.")],
        )

    @classmethod
    def validate_inputs(
        cls,
        cross_replace: float | None = None,
        self_replace: float | None = None,
        blend_threshold: float | None = None,
    ):
        return (
            number_error(cls, cross_replace=cross_replace, self_replace=self_replace, blend_threshold=blend_threshold)
            or True
        )

    @classmethod
    def execute(
        cls,
        model,
        edit: EditSpec,
        cross_replace: float,
        self_replace: float,
        local_blend: bool,
        blend_threshold: float,
    ) -> io.NodeOutput:
        if compat.model_state(model, EDIT_KEY) is not None:
            raise ValueError(
                "model: this MODEL is already patched for an edit by a BLIP-Diffusion Prompt-to-Prompt; connect the "
                "unpatched MODEL"
            )
        patched = compat.clone_model(model)
        layers = compat.attention_layers(patched)
        if not layers:
            raise ValueError("model: no attention layers found; BLIP-Diffusion editing needs an SD-1.5 UNet")
        for layer in layers:
            for is_cross in (False, True):
                compat.replace_attention(patched, layer, is_cross, _AttentionEdit(layer, is_cross), RUN_KEY)
        settings = EditSettings(cross_replace, self_replace, local_blend, blend_threshold)
        compat.set_model_state(patched, EDIT_KEY, EditModel(edit, settings))
        compat.wrap_sampling(patched, EDIT_KEY, RUN_KEY, lambda start: _begin(edit, settings, start))
        compat.wrap_model_calls(patched, EDIT_KEY, RUN_KEY, _after_call)
        compat.add_post_cfg(patched, RUN_KEY, _source_row_guidance)
        return io.NodeOutput(patched)


class _AttentionEdit:
    """The attention replace patch of one layer: the run's EditRun edits its output (or leaves it)."""

    def __init__(self, layer: compat.Layer, is_cross: bool):
        self.layer, self.is_cross = layer, is_cross

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: compat.AttentionCall) -> torch.Tensor:
        out = call.unpatched()
        run: EditRun | None = call.state
        if run is None:  # outside a sampling run (nothing to edit)
            return out
        return run.attend(self.layer, self.is_cross, q, k, v, call.heads, call.conditional, out, call.attention)


def check_edit(spec: EditSpec, positive_marks: list, latent_batch: int) -> None:
    """The sampler's positive is this edit's CONDITIONING alone and the latent one start for both rows."""
    if len(positive_marks) != 1:
        raise ValueError(
            f"positive: an edit needs the BLIP-Diffusion Edit Prompt's CONDITIONING alone (one entry of two rows); "
            f"this positive has {len(positive_marks)} entries (combined or area conditionings): connect the Edit "
            "Prompt's conditioning directly"
        )
    if positive_marks[0] != spec.key:
        raise ValueError(
            "positive: this MODEL is patched for an edit by BLIP-Diffusion Prompt-to-Prompt, which needs as "
            "positive the CONDITIONING of the same BLIP-Diffusion Edit Prompt as its edit input; for other "
            "prompts (and for the DDIM Inversion) use the unpatched MODEL"
        )
    if latent_batch != 1:
        raise ValueError(
            f"latent_image: an edit samples its two rows (source, target) from one start; give a latent of batch 1 "
            f"(got {latent_batch})"
        )


def sampled_batch(model, positive: list, latent_batch: int) -> int:
    """The batch a sampler of `model` samples from a latent of `latent_batch` (an edit: its two rows), after
    checking that an edit's MODEL and CONDITIONING come together."""
    edit: EditModel | None = compat.model_state(model, EDIT_KEY)
    marks = [extra.get(EDIT_KEY) for _, extra in positive]
    if edit is None:
        if any(marks):
            raise ValueError(
                "positive: this is a BLIP-Diffusion Edit Prompt's CONDITIONING (two rows: source and target); sample "
                "it with the MODEL from BLIP-Diffusion Prompt-to-Prompt, which edits the target row's attention"
            )
        return latent_batch
    check_edit(edit.spec, marks, latent_batch)
    return ROWS


def claim_step_hook(model_options: dict) -> StepHook | None:
    """For the pack's samplers: LocalBlend to run after each model call's update, when sampling an edit."""
    run: EditRun | None = compat.sampling_state(model_options, RUN_KEY)
    return None if run is None else run.claim_exact_blend()


def _begin(spec: EditSpec, settings: EditSettings, start: compat.SamplingStart):
    check_edit(spec, start.positive_marks, start.latent.shape[0])
    noise, latent = (t.expand(ROWS, *t.shape[1:]).clone() for t in (start.noise, start.latent))
    run = EditRun(
        spec,
        settings,
        steps=len(start.sigmas) - 1,
        latent_hw=tuple(latent.shape[-2:]),
        # No noise: the latent itself is the start, a real photo's inversion, which the source row reproduces
        # with its conditional prediction, as the original does (the target row keeps CFG).
        source_conditional=not bool(noise.any()),
    )
    return run, noise, latent


def _after_call(run: EditRun, denoised: torch.Tensor) -> torch.Tensor:
    if run.call == 0 and run.blends_x0():
        logging.warning(
            "BLIP-Diffusion Prompt-to-Prompt: this sampler blends nothing between its steps, so LocalBlend is "
            "applied to each step's x0 prediction instead: an approximation of the original, which the "
            "BLIP-Diffusion Sampler's pndm and reference_ddim reproduce exactly"
        )
    out = run.blend(denoised) if run.blends_x0() else denoised
    run.end_call()
    return out


def _source_row_guidance(run: EditRun, denoised: torch.Tensor, cond_denoised: torch.Tensor) -> torch.Tensor:
    if not run.source_conditional:
        return denoised
    return torch.cat([cond_denoised[:1], denoised[1:]])


NODES = [BlipDiffusionEditPrompt, BlipDiffusionPromptToPrompt]
