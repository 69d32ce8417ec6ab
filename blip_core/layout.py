"""The released BLIP-Diffusion folder layout, in one table.

The loaders, the folder checks, the model lists of the nodes and the tiny-model maker all
read it, so an accepted file name is written once. A model folder is the diffusers layout
of Salesforce/blipdiffusion (and blipdiffusion-controlnet):

    model_index.json
    qformer/       config.json + transformers weights   BLIP-2 subject encoder
    text_encoder/  config.json + transformers weights   CLIP-L text encoder
    tokenizer/     CLIP vocabulary (not read: ComfyUI's SD-1.5 tokenizer is the same)
    unet/          config.json + diffusers weights
    vae/           config.json + diffusers weights
    controlnet/    config.json + diffusers weights      a canny ControlNet

`DOWNLOADS` is the other table: every model the nodes read, the folder it goes in and its
public download page. The loaders' not-found errors, the example workflows' model list
(ComfyUI's missing-models dialog, tools/workflows.py), the registry's [tool.comfy] Models
and the README say what it says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # read only with torch.load(weights_only=True)
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
# ComfyUI's model folders (models/<name>) the nodes read: the pack registers the first and the last.
MODELS_FOLDER = "blip_diffusion"
CONTROLNETS_FOLDER = "controlnet"  # ComfyUI's own
ANNOTATORS_FOLDER = "annotators"  # preprocessor weights, e.g. models/annotators/Annotators/ControlNetHED.pth


def _weight_names(safetensors_stem: str, pickle_stem: str) -> tuple[str, ...]:
    """The names transformers and diffusers save under, in order of preference: [0] is what a
    safetensors save writes, [1] what a pickle save writes."""
    return (
        f"{safetensors_stem}.safetensors",
        f"{pickle_stem}.bin",
        f"{safetensors_stem}.fp16.safetensors",
        f"{pickle_stem}.fp16.bin",
    )


TRANSFORMERS_WEIGHTS = _weight_names("model", "pytorch_model")
DIFFUSERS_WEIGHTS = _weight_names("diffusion_pytorch_model", "diffusion_pytorch_model")


@dataclass(frozen=True)
class Part:
    """A sub-folder of a model folder: its weight file names and whether the pack reads its config."""

    folder: str
    weights: tuple[str, ...]
    reads_config: bool

    def weights_file(self, model: Path) -> Path:
        """`model/<folder>/<first existing name>`, or an error naming the folder and the files expected there."""
        return self.weights_in(model / self.folder, model.name)

    def weights_in(self, folder: Path, label: str = "") -> Path:
        """The first of the accepted names that exists in `folder` (this part's folder, wherever it is)."""
        for name in self.weights:
            if (folder / name).is_file():
                return folder / name
        raise FileNotFoundError(
            f"{label or folder.name}: missing {self.folder}/ weights: expected {folder}/"
            f"{self.weights[0]} (or {', '.join(self.weights[1:])})"
        )

    def config_file(self, model: Path) -> Path:
        return model / self.folder / CONFIG

    def missing(self, model: Path) -> list[str]:
        """What of this part is not in `model`, as `<folder>/<file>` entries."""
        found = []
        if self.reads_config and not self.config_file(model).is_file():
            found.append(f"{self.folder}/{CONFIG}")
        if not any((model / self.folder / name).is_file() for name in self.weights):
            found.append(f"{self.folder}/{self.weights[0]} (or {', '.join(self.weights[1:])})")
        return found


QFORMER = Part("qformer", TRANSFORMERS_WEIGHTS, reads_config=True)
# ComfyUI recognises the CLIP and the VAE from their tensors; their config.json files are not read.
TEXT_ENCODER = Part("text_encoder", TRANSFORMERS_WEIGHTS, reads_config=False)
UNET = Part("unet", DIFFUSERS_WEIGHTS, reads_config=True)
VAE = Part("vae", DIFFUSERS_WEIGHTS, reads_config=False)
CONTROLNET = Part("controlnet", DIFFUSERS_WEIGHTS, reads_config=True)
LOADER_PARTS = (QFORMER, TEXT_ENCODER, UNET, VAE)  # what the BLIP-Diffusion Loader reads


@dataclass(frozen=True)
class Download:
    """A model the nodes read: the folder it goes in and where to get it."""

    folder: str  # ComfyUI's model folder: models/<folder>
    name: str  # the folder (or file) in it that the example workflows pick
    page: str  # the public download page (a Hugging Face repository)
    files: tuple[str, ...]  # the weight files the nodes read, by their path in both `name` and the repository

    @property
    def location(self) -> str:
        return f"models/{self.folder}/{self.name}/"

    def url(self, file: str) -> str:
        """The file's download link."""
        return f"{self.page}/resolve/main/{file}"

    def hint(self) -> str:
        """What to do when it is missing, for the loaders' errors."""
        what = "the whole repository, with its sub-folders," if len(self.files) > 2 else " and ".join(self.files)
        return f"download {what} from {self.page} into {self.location}"


def _pickle_files(parts: tuple[Part, ...]) -> tuple[str, ...]:
    """The names the releases store these parts under: their pickle names."""
    return tuple(f"{part.folder}/{part.weights[1]}" for part in parts)


BLIP_DIFFUSION = Download(
    MODELS_FOLDER, "blipdiffusion", "https://huggingface.co/Salesforce/blipdiffusion", _pickle_files(LOADER_PARTS)
)
# The canny ControlNet the blipdiffusion repository carries in controlnet/ (the only safetensors file there).
BLIP_DIFFUSION_CANNY = Download(
    MODELS_FOLDER, BLIP_DIFFUSION.name, BLIP_DIFFUSION.page, (f"{CONTROLNET.folder}/{CONTROLNET.weights[0]}",)
)
# The same model with the canny ControlNet as a pickle: the release diffusers' ControlNet pipeline names.
BLIP_DIFFUSION_CONTROLNET = Download(
    MODELS_FOLDER,
    "blipdiffusion-controlnet",
    "https://huggingface.co/Salesforce/blipdiffusion-controlnet",
    _pickle_files((*LOADER_PARTS, CONTROLNET)),
)
SCRIBBLE_CONTROLNET = Download(
    CONTROLNETS_FOLDER,
    "sd-controlnet-scribble",
    "https://huggingface.co/lllyasviel/sd-controlnet-scribble",
    (CONTROLNET.weights[0],),
)
HED_ANNOTATOR = Download(
    ANNOTATORS_FOLDER, "Annotators", "https://huggingface.co/lllyasviel/Annotators", ("ControlNetHED.pth",)
)
DOWNLOADS = (BLIP_DIFFUSION, BLIP_DIFFUSION_CANNY, BLIP_DIFFUSION_CONTROLNET, SCRIBBLE_CONTROLNET, HED_ANNOTATOR)


def check_model_folder(model: Path, parts: tuple[Part, ...] = LOADER_PARTS) -> None:
    """Every file the loader reads, checked before any is loaded: one error lists all that are missing,
    instead of failing on the last part after minutes of loading the others."""
    missing = [entry for part in parts for entry in part.missing(model)]
    if missing:
        raise FileNotFoundError(
            f"{model.name}: incomplete BLIP-Diffusion folder {model}: missing {'; '.join(missing)}. "
            f"It needs the released layout ({MODEL_INDEX}, "
            f"{', '.join(p.folder + '/' for p in LOADER_PARTS)}): {BLIP_DIFFUSION.hint()}"
        )
