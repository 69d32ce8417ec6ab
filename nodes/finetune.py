"""Subject fine-tuning inside ComfyUI: the original's recipe (blip_core/finetune.py), its checkpoints, and files
that stock ComfyUI loads.

- BlipDiffusionFinetune trains on 3-5 photos: the fine-tuned MODEL (the input MODEL plus a weight patch, as a
  LoRA loader adds one, so other LoRAs and patches still apply), the trained subject and the loss curve.
- BlipDiffusionLAVISFinetunedLoader makes the same two from a checkpoint of LAVIS's own fine-tuning.
- BlipDiffusionSaveFinetune writes what either made: a file ComfyUI's stock LoraLoaderModelOnly applies
  (a LoRA, or a weight difference) and the subject file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..blip_core.finetune import (
    MODES,
    RESOLUTION,
    Posterior,
    Settings,
    StepDraws,
    SubjectFinetune,
    caption,
    crop_photos,
    diff_tensors,
    lora_tensors,
    state_bytes,
)
from ..blip_core.lavis_checkpoint import read_lavis_checkpoint
from ..blip_core.layout import WEIGHT_SUFFIXES
from ..blip_core.loss_curve import as_comfy_image, loss_curve_image
from ..blip_core.subject import Subject, check_category
from ..blip_core.subject_blend import average_views
from ..blip_core.subject_file import save_subject
from . import compat, paths
from .api import CATEGORY, SubjectType, combo_error, io, number_error
from .prompt import fused_tokens

FILE_FORMAT = "blip_diffusion_finetune"
FILE_VERSION = "1"
# A training step keeps the UNet's activations for the backward pass: estimated at this many times what ComfyUI
# reserves for one inference call on the same latents (an estimate; `bench/run.py --only finetune` measures the
# peaks, README "Fine-tuning a subject").
ACTIVATION_FACTOR = 4
MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048
PREVIEW = 512  # px: the loss curve shown on the node while it trains
DIFF_FILE_DTYPE = torch.float16  # weight differences are small: half precision halves the file (README)


@dataclass
class FinetuneRecord:
    """What BlipDiffusionSaveFinetune writes, attached to the fine-tuned MODEL: the weights file's tensors
    (kohya LoRA keys, float32), its kind (diff, lora, or none for a subject-only run) and its metadata."""

    tensors: dict[str, torch.Tensor]
    kind: str
    metadata: dict[str, str] = field(default_factory=dict)


def one(values: list, name: str):
    """The node takes lists (is_input_list, for photos of several sizes); every other input must be single."""
    if len(values) != 1:
        raise ValueError(f"{name}: expected one {name}, got a list of {len(values)}")
    return values[0]


def first(value):
    """A widget value as validate_inputs receives it on a list node ([value]), or None for a linked input."""
    return value[0] if isinstance(value, list) and value else None if isinstance(value, list) else value


def subject_start(subjects: list[Subject]) -> torch.Tensor:
    """The original's start: the mean of every photo's zero-shot subject (all views of all subjects given)."""
    return average_views(torch.cat([s.embeds.float() for s in subjects]))


def caption_encoder(clip, text: str, width: int, device: torch.device):
    """f(subject [16, D]) -> CLIP's output for the caption with the subject spliced in after "a", cut after
    its end token as the original's unpadded caption (CLIP's causal attention makes the cut exact)."""
    if compat.clip_encoders(clip) != ["l"] or compat.clip_l_width(clip) != width:
        raise ValueError(
            f"clip: fine-tuning needs the SD-1.5 CLIP (CLIP-L, {width}-wide tokens) of the same BLIP-Diffusion model"
        )
    eos = compat.clip_l_tokens(clip, "")[0][1][0]
    chunk = fused_tokens(clip, text, torch.zeros(16, width))[0]
    length = next(i for i, entry in enumerate(chunk) if i > 0 and isinstance(entry[0], int) and entry[0] == eos) + 1

    def encode(subject: torch.Tensor) -> torch.Tensor:
        return compat.clip_l_hidden_states(clip, fused_tokens(clip, text, subject))[:, :length].to(device)

    return encode


def trace_writer(folder: str):
    """Diagnostics (the parity test): every step's draws, loss and gradients as safetensors in `folder`."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)

    def trace(step: int, draws: StepDraws, loss: float, grads: dict[str, torch.Tensor]) -> None:
        tensors = {f"draws.{k}": v for k, v in vars(draws).items()}
        tensors["loss"] = torch.tensor([loss], dtype=torch.float64)
        tensors |= {f"grad.{k}": g.detach().float().cpu() for k, g in grads.items() if g is not None}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"step{step}.safetensors"))

    return trace


def out_of_memory(error: BaseException) -> bool:
    """A failed allocation: torch's OutOfMemoryError (GPUs), or the CPU allocator's error."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


class BlipDiffusionFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionFinetune",
            display_name="BLIP-Diffusion Fine-tune",
            category=f"{CATEGORY}/fine-tuning",
            description="Fine-tunes the subject on 3-5 photos with the original BLIP-Diffusion recipe (a few dozen "
            "steps; the paper's dog: 40). Photos of any sizes: each is resized and center-cropped as the original "
            "does. The input MODEL is never changed; the result is that MODEL plus the trained weights.",
            is_input_list=True,  # photos of different sizes arrive as a list (e.g. Load Image Dataset from Folder)
            inputs=[
                io.Model.Input("model", tooltip="The BLIP-Diffusion UNet (an SD-1.5 MODEL); its LoRAs stay applied."),
                io.Clip.Input("clip", tooltip="The BLIP-Diffusion CLIP (the caption is encoded with it)."),
                io.Vae.Input("vae", tooltip="The SD-1.5 VAE: the photos' latents come from its posterior."),
                SubjectType.Input(
                    "subject",
                    tooltip="The zero-shot subject of the same photos (Subject Encoder, preprocess 'crop' as the "
                    "original): the mean of its views is where training starts.",
                ),
                io.Image.Input(
                    "images",
                    tooltip="3-5 photos of the subject: a batch, or a list of photos of any sizes (each resized to "
                    "`resolution` on its short side, bicubic, and center-cropped).",
                ),
                io.String.Input(
                    "category",
                    default="",
                    tooltip='The category word of the caption "a <category>". Empty: the subject\'s category.',
                ),
                io.Int.Input("steps", default=40, min=1, max=10000, tooltip="Training steps (the paper's dog: 40)."),
                io.Float.Input(
                    "learning_rate",
                    default=5e-6,
                    min=0.0,
                    max=1.0,
                    step=1e-7,
                    round=1e-9,
                    tooltip="AdamW's learning rate, constant (the original: 5e-6 for unet+subject). lora+subject "
                    "and subject move little at 5e-6: try 1e-4 and 1e-3. 0 trains nothing.",
                ),
                io.Int.Input(
                    "batch_size",
                    default=3,
                    min=1,
                    max=64,
                    tooltip="Photos per step, drawn at random (the original: 3). Lower it if memory runs out.",
                ),
                io.Float.Input(
                    "weight_decay",
                    default=0.01,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="AdamW's weight decay on weight matrices and the subject, none on biases and norms "
                    "(the original: 0.01).",
                ),
                io.Combo.Input(
                    "train",
                    options=list(MODES),
                    default=MODES[0],
                    tooltip="unet+subject: the whole UNet and the subject (the original; the most memory). "
                    "lora+subject: a LoRA of rank `rank` and the subject (light). subject: the subject alone.",
                ),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="lora+subject only: the LoRA's rank."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seeds every random draw (photos, noise, timesteps, the LoRA's start); see the README.",
                ),
                io.Int.Input(
                    "resolution",
                    default=RESOLUTION,
                    min=MIN_RESOLUTION,
                    max=MAX_RESOLUTION,
                    step=8,
                    optional=True,
                    tooltip="Training size in pixels (the original: 512). Smaller trains faster and in less memory.",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The fine-tuned UNet: the input MODEL with the trained weights patched in."),
                SubjectType.Output(display_name="subject", tooltip="The trained subject, for the Multimodal Prompt."),
                io.Image.Output(display_name="loss", tooltip="The loss curve: each step's loss and a running mean."),
            ],
        )

    @classmethod
    def validate_inputs(cls, learning_rate=None, weight_decay=None, train=None, resolution=None):
        learning_rate, weight_decay, resolution = first(learning_rate), first(weight_decay), first(resolution)
        return (
            number_error(cls, learning_rate=learning_rate, weight_decay=weight_decay, resolution=resolution)
            or (f"resolution: expected a multiple of 8, got {resolution}" if resolution and resolution % 8 else None)
            or combo_error("train", first(train), list(MODES))
            or True
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        subject,
        images,
        category,
        steps,
        learning_rate,
        batch_size,
        weight_decay,
        train,
        rank,
        seed,
        resolution=(RESOLUTION,),
    ) -> io.NodeOutput:
        model, clip, vae = one(model, "model"), one(clip, "clip"), one(vae, "vae")
        settings = Settings(
            steps=one(steps, "steps"),
            learning_rate=one(learning_rate, "learning_rate"),
            batch_size=one(batch_size, "batch_size"),
            weight_decay=one(weight_decay, "weight_decay"),
            mode=one(train, "train"),
            rank=one(rank, "rank"),
            seed=one(seed, "seed"),
        )
        size = one(list(resolution), "resolution")
        problem = compat.finetune_problem(model)
        if problem:
            raise ValueError(f"model: {problem}")
        word = check_category(one(category, "category").strip() or subject[0].category, "category")
        start = subject_start(subject)
        photos = crop_photos(images, size)
        posterior = Posterior.from_moments(compat.vae_posterior_moments(vae, photos))
        logging.info(
            f"BLIP-Diffusion Fine-tune: {settings.mode}, {len(posterior)} photos at {size}x{size}, "
            f"{settings.steps} steps of batch {settings.batch_size}, learning rate {settings.learning_rate:g}"
        )
        with torch.inference_mode(False):
            record, subject_embeds, losses = train_subject(model, clip, posterior, start, word, settings, size)
        out_model = compat.with_weight_file(model, record.tensors, changed(record))
        record.metadata |= {"category": word, "resolution": str(size), "photos": str(len(posterior))}
        compat.set_finetune_record(out_model, record)
        metadata = {k: v for k, v in subject[0].metadata.items() if k != "blend"}
        metadata["finetune"] = f"{settings.mode}, {settings.steps} steps, learning rate {settings.learning_rate:g}"
        trained = Subject(subject_embeds, word, metadata)
        return io.NodeOutput(out_model, trained, as_comfy_image(loss_curve_image(losses)))


def changed(record: FinetuneRecord) -> int:
    """How many UNet tensors a weights file changes: one per difference, one per LoRA (up, down, alpha)."""
    return len(record.tensors) if record.kind == "diff" else len(record.tensors) // 3


def train_subject(model, clip, posterior: Posterior, start: torch.Tensor, word: str, settings: Settings, size: int):
    """The training loop under ComfyUI's model management: (record, trained subject, losses). A cancel or an
    error leaves the input MODEL as it was: the run only ever replaced its tensors while a step ran."""
    unet = compat.unet_module(model)
    latent = (settings.batch_size, 4, size // 8, size // 8)
    need = state_bytes(unet.parameters(), settings.mode, settings.rank)
    need += ACTIVATION_FACTOR * compat.training_memory(model, latent)
    trainer, failure = None, None
    try:
        device = compat.load_for_training(model, clip, need)
        encode = caption_encoder(clip, caption(word), start.shape[-1], device)
        trainer = SubjectFinetune(
            unet,
            compat.unet_noise_call(model),
            compat.clip_module(clip),
            encode,
            posterior,
            start,
            settings,
            compat.unet_diffusers_names(model),
            device,
            compat.unet_compute_dtype(model),
        )
        trace_folder = compat.finetune_trace_folder(model)
        trace = trace_writer(trace_folder) if trace_folder else None
        bar, losses = compat.ProgressBar(settings.steps), []
        for i in range(settings.steps):
            compat.throw_if_interrupted()
            losses.append(trainer.step(trace))
            logging.info(f"BLIP-Diffusion Fine-tune: step {i + 1}/{settings.steps}, loss {losses[-1]:.5f}")
            bar.update_absolute(i + 1, settings.steps, ("PNG", loss_curve_image(losses, settings.steps), PREVIEW))
        if trace is not None:
            save_file(
                {n: t.detach().float().cpu().contiguous() for n, t in trainer.trained()},
                f"{trace_folder}/final.safetensors",
            )
        record = finetune_record(trainer, settings, losses)
        return record, trainer.subject_embeds(), losses
    except Exception as e:
        if not out_of_memory(e):
            raise
        failure = str(e).splitlines()[0]  # raised below, once this frame no longer holds the step's tensors
    finally:
        del trainer
        compat.free_cache()
    raise MemoryError(
        f"BLIP-Diffusion Fine-tune ran out of memory ({settings.mode}, batch_size {settings.batch_size}, "
        f"resolution {size}): lower batch_size or resolution, or train lora+subject or subject, which need less "
        f"(README: Fine-tuning a subject). The input MODEL is unchanged. ({failure})"
    )


def finetune_record(trainer: SubjectFinetune, settings: Settings, losses: list[float]) -> FinetuneRecord:
    metadata = {
        "train": settings.mode,
        "steps": str(settings.steps),
        "learning_rate": repr(settings.learning_rate),
        "batch_size": str(settings.batch_size),
        "weight_decay": repr(settings.weight_decay),
        "seed": str(settings.seed),
        "losses": json.dumps([round(v, 7) for v in losses]),
    }
    if settings.mode == "unet+subject":
        return FinetuneRecord(diff_tensors(trainer.weight_deltas()), "diff", metadata)
    if settings.mode == "lora+subject":
        return FinetuneRecord(lora_tensors(trainer.lora_factors()), "lora", metadata | {"rank": str(settings.rank)})
    return FinetuneRecord({}, "none", metadata)


class BlipDiffusionLAVISFinetunedLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionLAVISFinetunedLoader",
            display_name="BLIP-Diffusion LAVIS Fine-tuned Loader",
            category=f"{CATEGORY}/fine-tuning",
            description="Loads what the original LAVIS fine-tuning wrote (checkpoint_N.pth): its UNet as a patch of "
            "the given MODEL (LoRAs and other patches still apply) and its learned subject. Only tensors are read "
            "(torch.load weights_only, memory-mapped); the optimizer state in the file is never loaded.",
            inputs=[
                io.Model.Input("model", tooltip="The BLIP-Diffusion UNet the checkpoint was fine-tuned from."),
                io.Combo.Input(
                    "checkpoint",
                    options=paths.finetuned_checkpoints(),
                    tooltip=f"A LAVIS fine-tuned checkpoint in models/{paths.FINETUNED} (checkpoint_N.pth).",
                ),
                io.String.Input(
                    "category",
                    default="",
                    tooltip="The subject's category word. Empty: the subject word stored in the checkpoint's config.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    tooltip="The fine-tuned UNet: the input MODEL with the checkpoint's weights patched in."
                ),
                SubjectType.Output(display_name="subject", tooltip="The learned subject (ctx_embeddings_cache)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, checkpoint: str | None = None):
        expected = f"is not a weights file ({', '.join(sorted(WEIGHT_SUFFIXES))})"
        return (
            paths.entry_error("checkpoint", checkpoint, paths.FINETUNED, "checkpoint", paths.is_weights_file, expected)
            or True
        )

    @classmethod
    def fingerprint_inputs(cls, model, checkpoint: str, category: str):
        """A file replaced under the same name is loaded again (by its size and time, not its gigabytes)."""
        try:
            stat = paths.resolve(checkpoint, paths.FINETUNED, "checkpoint").stat()
        except (ValueError, OSError):
            return checkpoint  # validation reports the problem
        return f"{checkpoint}:{stat.st_size}:{stat.st_mtime_ns}:{category}"

    @classmethod
    def execute(cls, model, checkpoint: str, category: str) -> io.NodeOutput:
        path = paths.resolve(checkpoint, paths.FINETUNED, "checkpoint")
        problem = compat.finetune_problem(model)
        if problem:
            raise ValueError(f"model: {problem}")
        finetuned = read_lavis_checkpoint(path)
        word = category.strip() or finetuned.category
        if not word:
            raise ValueError(
                f"category: {path.name} does not say what subject it was fine-tuned on; type its category word"
            )
        word = check_category(word, "category")
        deltas = unet_differences(model, finetuned.unet, path.name)
        record = FinetuneRecord(
            diff_tensors(deltas), "diff", {"source": "LAVIS fine-tuned checkpoint", "checkpoint": path.name}
        )
        out_model = compat.with_weight_file(model, record.tensors, changed(record))
        compat.set_finetune_record(out_model, record)
        metadata = {"source": "LAVIS ctx_embeddings_cache", "checkpoint": path.name}
        return io.NodeOutput(out_model, Subject(finetuned.subject, word, metadata))


def unet_differences(model, finetuned: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Fine-tuned minus the MODEL's own weights (float32), by diffusers name, after checking that every
    fine-tuned tensor is one of this UNet's, of the same shape."""
    ldm = {diffusers: name for name, diffusers in compat.unet_diffusers_names(model).items()}
    base = compat.unet_weights(model)
    unknown = sorted(k for k in finetuned if k not in ldm)
    if unknown:
        raise ValueError(
            f"{source}: UNet tensors this MODEL's UNet does not have ({len(unknown)}, e.g. {unknown[:3]}): "
            "a checkpoint of another architecture, or fine-tuned from another model"
        )
    mis_shaped = [
        f"{k} {tuple(v.shape)} (the MODEL's: {tuple(base[ldm[k]].shape)})"
        for k, v in finetuned.items()
        if v.shape != base[ldm[k]].shape
    ]
    if mis_shaped:
        raise ValueError(
            f"{source}: UNet tensors of other shapes than this MODEL's, so a checkpoint of another architecture "
            f"({len(mis_shaped)} in all, e.g. {'; '.join(mis_shaped[:2])}); BLIP-Diffusion's UNet is SD-1.5's"
        )
    return {k: v.float() - base[ldm[k]].float() for k, v in finetuned.items()}


class BlipDiffusionSaveFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BlipDiffusionSaveFinetune",
            display_name="BLIP-Diffusion Save Fine-tune",
            category=f"{CATEGORY}/fine-tuning",
            description="Saves a fine-tune as files stock ComfyUI loads: the weights (a LoRA for lora+subject, a "
            "weight difference for unet+subject; apply either with LoraLoaderModelOnly to the same BLIP-Diffusion "
            "MODEL) and the subject (a subject file for Load Subject).",
            inputs=[
                io.Model.Input("model", tooltip="From BLIP-Diffusion Fine-tune or the LAVIS Fine-tuned Loader."),
                SubjectType.Input("subject", tooltip="The trained subject."),
                io.String.Input(
                    "filename_prefix",
                    default="blip_diffusion/finetuned/subject",
                    tooltip="File names inside the output folder (subfolders allowed): <prefix>_00001_.safetensors "
                    "(the weights: move it to models/loras) and <prefix>_00001_subject.safetensors (the subject: "
                    "move it to models/blip_diffusion_subjects).",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str | None = None):
        return paths.prefix_error(filename_prefix) or True

    @classmethod
    def execute(cls, model, subject, filename_prefix: str) -> io.NodeOutput:
        record = compat.finetune_record(model)
        if record is None:
            raise ValueError(
                "model: this MODEL carries no fine-tune; connect the MODEL output of BLIP-Diffusion Fine-tune or of "
                "the LAVIS Fine-tuned Loader (LoRA loaders between them keep it)"
            )
        (weights, subject_path), subfolder = paths.output_files(
            filename_prefix, (".safetensors", "subject.safetensors")
        )
        files = []
        if record.tensors:
            tensors = {k: v.to(DIFF_FILE_DTYPE) if record.kind == "diff" else v for k, v in record.tensors.items()}
            metadata = {"format": FILE_FORMAT, "version": FILE_VERSION, "kind": record.kind, **record.metadata}
            save_file(tensors, str(weights), metadata=metadata)
            files.append(weights)
        save_subject(subject, subject_path)
        files.append(subject_path)
        return io.NodeOutput(
            ui={"finetune": [{"filename": f.name, "subfolder": subfolder, "type": "output"} for f in files]}
        )


NODES = [BlipDiffusionFinetune, BlipDiffusionLAVISFinetunedLoader, BlipDiffusionSaveFinetune]
