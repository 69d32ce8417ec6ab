"""The one way the tests, bench/ and tools/demo.py build API-format graphs (what POST /prompt takes)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEGATIVE = "over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped"
# What shrink() edits: the image size inputs of these nodes, and every "steps" input.
SIZE_INPUTS = {
    "EmptyLatentImage": ("width", "height"),
    "ImageScale": ("width", "height"),
    "BlipDiffusionFinetune": ("resolution",),
}


class Graph(dict):
    """An API-format prompt, node id -> {"class_type", "inputs"}, built node by node."""

    def add(self, class_type: str, node_id: str | None = None, **inputs) -> list:
        """Add a node (numbered after the others unless `node_id` is given); its first output socket."""
        if node_id is None:
            node_id = str(1 + max((int(k) for k in self if k.isdigit()), default=0))
        self[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]


class SubjectGraph(Graph):
    """A graph that starts from a BLIP-Diffusion Loader (`model` is its node id) and encodes subjects."""

    def __init__(self, model: str):
        super().__init__()
        self.model = self.add("BlipDiffusionLoader", model_name=model, weight_dtype="auto")[0]

    def image(self, name: str = "blipd_example_cat.jpg") -> list:
        return self.add("LoadImage", image=name)

    def encode(self, image: list, category: str = "cat", preprocess: str = "squash", **mask) -> list:
        return self.add(
            "BlipDiffusionSubjectEncoder",
            subject_encoder=[self.model, 3],
            image=image,
            subject=category,
            preprocess=preprocess,
            **mask,
        )

    def fuse(self, subject: list, multi_image: str = "average", prompt: str = "on a beach", **extra) -> list:
        return self.add(
            "BlipDiffusionMultimodalPromptFuse",
            clip=[self.model, 1],
            subject=subject,
            prompt=prompt,
            target_subject="",
            prompt_strength=1.0,
            prompt_reps=20,
            multi_image=multi_image,
            **extra,
        )


def twin(name: str) -> Graph:
    """A committed API twin, workflows/api/<name>.json."""
    return Graph(json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text()))


def shrink(prompt: dict, size: int = 128, steps: int = 3) -> Graph:
    """The same graph at a CPU-friendly size: smaller images and fewer sampler steps."""
    prompt = Graph(json.loads(json.dumps(prompt)))
    for node in prompt.values():
        for key in SIZE_INPUTS.get(node["class_type"], ()):
            node["inputs"][key] = size
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return prompt


def zero_shot(
    model: str,
    image: str = "blipd_example_cat.jpg",
    subject: str = "cat",
    prompt: str = "swimming underwater",
    target: str = "",
    negative: str = NEGATIVE,
    size: int = 128,
    steps: int = 3,
    seed: int = 0,
    cfg: float = 7.5,
    strength: float = 1.0,
    reps: int = 20,
    batch: int = 1,
    multi_image: str = "average",
    prefix: str = "zero_shot",
    height: int | None = None,
) -> Graph:
    """Loader (1) -> photo (2) -> subject (3) -> fused prompt (4) + negative (5) -> empty latent (6) ->
    BlipDiffusionSampler (7) -> VAEDecode (8) -> SaveImage (9); tests address the nodes by these ids."""
    g = Graph()
    loader = g.add("BlipDiffusionLoader", "1", model_name=model, weight_dtype="auto")
    photo = g.add("LoadImage", "2", image=image)
    encoded = g.add(
        "BlipDiffusionSubjectEncoder",
        "3",
        subject_encoder=[loader[0], 3],
        image=photo,
        subject=subject,
        preprocess="squash",
    )
    positive = g.add(
        "BlipDiffusionMultimodalPromptFuse",
        "4",
        clip=[loader[0], 1],
        subject=encoded,
        prompt=prompt,
        target_subject=target,
        prompt_strength=strength,
        prompt_reps=reps,
        multi_image=multi_image,
    )
    negative = g.add("CLIPTextEncode", "5", clip=[loader[0], 1], text=negative)
    latent = g.add("EmptyLatentImage", "6", width=size, height=height or size, batch_size=batch)
    samples = g.add(
        "BlipDiffusionSampler",
        "7",
        model=loader,
        positive=positive,
        negative=negative,
        latent_image=latent,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name="pndm",
        scheduler="reference",
        denoise=1.0,
    )
    decoded = g.add("VAEDecode", "8", samples=samples, vae=[loader[0], 2])
    g.add("SaveImage", "9", images=decoded, filename_prefix=prefix)
    return g


def inversion(
    model: str,
    image: str,
    prompt: str = "a cat sitting on a sofa",
    negative: str = NEGATIVE,
    steps: int = 4,
    cfg: float = 7.5,
    invert_cfg: float = 1.0,
    prefix: str = "inversion",
) -> Graph:
    """Loader (1) -> photo (2) -> VAEEncode (3) -> prompt (4), negative (5) -> DDIM Inversion (6) ->
    BlipDiffusionSampler reference_ddim from it (7) -> VAEDecode (8) -> SaveImage (9)."""
    g = Graph()
    loader = g.add("BlipDiffusionLoader", "1", model_name=model, weight_dtype="auto")[0]
    latent = g.add("VAEEncode", "3", pixels=g.add("LoadImage", "2", image=image), vae=[loader, 2])
    positive = g.add("CLIPTextEncode", "4", clip=[loader, 1], text=prompt)
    negative = g.add("CLIPTextEncode", "5", clip=[loader, 1], text=negative)
    inverted = g.add(
        "BlipDiffusionDDIMInversion",
        "6",
        model=[loader, 0],
        positive=positive,
        latent=latent,
        steps=steps,
        cfg=invert_cfg,
    )
    samples = g.add(
        "BlipDiffusionSampler",
        "7",
        model=[loader, 0],
        positive=positive,
        negative=negative,
        latent_image=inverted,
        seed=0,
        steps=steps,
        cfg=cfg,
        sampler_name="reference_ddim",
        scheduler="reference",
        denoise=1.0,
    )
    g.add("SaveImage", "9", images=g.add("VAEDecode", "8", samples=samples, vae=[loader, 2]), filename_prefix=prefix)
    return g


def edit(
    model: str,
    photo: str | None = None,
    subject_image: str = "blipd_example_cat.jpg",
    subject: str = "cat",
    subject_file: str | None = None,
    source: str = "dog",
    prompt: str = "on the grass",
    target: str = "",
    placeholder: str = "lavis",
    negative: str = NEGATIVE,
    size: int = 64,
    steps: int = 4,
    seed: int = 0,
    cfg: float = 7.5,
    cross_replace: float = 0.8,
    self_replace: float = 0.4,
    local_blend: bool = True,
    threshold: float = 0.3,
    sampler: str | None = None,
    prefix: str = "edit",
) -> Graph:
    """A subject-driven edit. Loader (1) -> subject photo (2) -> subject (3) (or Load Subject (3) of
    `subject_file`) -> Edit Prompt (4) + negative (5) -> Prompt-to-Prompt (6) -> the start (7) ->
    BlipDiffusionSampler (8) -> VAEDecode (9) -> SaveImage (10). The start: an empty latent of `size`
    (generate then edit, pndm), or with `photo`: LoadImage (11) -> VAEEncode (12) -> DDIM Inversion (7) with
    the Edit Prompt's source prompt (reference_ddim)."""
    g = Graph()
    loader = g.add("BlipDiffusionLoader", "1", model_name=model, weight_dtype="auto")[0]
    if subject_file is None:
        encoded = g.add(
            "BlipDiffusionSubjectEncoder",
            "3",
            subject_encoder=[loader, 3],
            image=g.add("LoadImage", "2", image=subject_image),
            subject=subject,
            preprocess="squash",
        )
    else:
        encoded = g.add("BlipDiffusionLoadSubject", "3", subject_file=subject_file)
    g.add(
        "BlipDiffusionEditPrompt",
        "4",
        clip=[loader, 1],
        subject=encoded,
        source_subject=source,
        prompt=prompt,
        target_subject=target,
        placeholder=placeholder,
    )
    g.add("CLIPTextEncode", "5", clip=[loader, 1], text=negative)
    g.add(
        "BlipDiffusionPromptToPrompt",
        "6",
        model=[loader, 0],
        edit=["4", 1],
        cross_replace=cross_replace,
        self_replace=self_replace,
        local_blend=local_blend,
        blend_threshold=threshold,
    )
    if photo is None:
        g.add("EmptyLatentImage", "7", width=size, height=size, batch_size=1)
    else:
        g.add(
            "BlipDiffusionDDIMInversion",
            "7",
            model=[loader, 0],
            positive=["4", 2],
            latent=g.add("VAEEncode", "12", pixels=g.add("LoadImage", "11", image=photo), vae=[loader, 2]),
            steps=steps,
            cfg=1.0,
        )
    samples = g.add(
        "BlipDiffusionSampler",
        "8",
        model=["6", 0],
        positive=["4", 0],
        negative=["5", 0],
        latent_image=["7", 0],
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler or ("pndm" if photo is None else "reference_ddim"),
        scheduler="reference",
        denoise=1.0,
    )
    g.add("SaveImage", "10", images=g.add("VAEDecode", "9", samples=samples, vae=[loader, 2]), filename_prefix=prefix)
    return g


def finetune(
    model: str,
    photos: str,
    image: str = "blipd_example_cat.jpg",
    subject: str = "cat",
    steps: int = 3,
    trace: str | None = None,
    **settings,
) -> Graph:
    """Loader (1) -> the subject photo (2) -> its zero-shot subject (3, preprocess crop); the training photos, a
    folder of the input folder (4), optionally through ProbeFinetuneTrace (5) -> BlipDiffusion Fine-tune (6)
    -> its loss curve previewed (19): 3 steps of the original recipe at 64x64 unless `settings` say otherwise."""
    g = Graph()
    loader = g.add("BlipDiffusionLoader", "1", model_name=model, weight_dtype="auto")[0]
    photo = g.add("LoadImage", "2", image=image)
    encoded = g.add(
        "BlipDiffusionSubjectEncoder", "3", subject_encoder=[loader, 3], image=photo, subject=subject, preprocess="crop"
    )
    images = g.add("LoadImageDataSetFromFolder", "4", folder=photos)
    unet = [loader, 0] if trace is None else g.add("ProbeFinetuneTrace", "5", model=[loader, 0], name=trace)
    recipe = dict(
        category="",
        learning_rate=5e-6,
        batch_size=3,
        weight_decay=0.01,
        train="unet+subject",
        rank=8,
        seed=0,
        resolution=64,
    )
    g.add(
        "BlipDiffusionFinetune",
        "6",
        model=unet,
        clip=[loader, 1],
        vae=[loader, 2],
        subject=encoded,
        images=images,
        steps=steps,
        **(recipe | settings),
    )
    g.add("PreviewImage", "19", images=["6", 2])
    return g


def loaded_subject(subject_file: str, probe_name: str = "loaded") -> Graph:
    """BLIP-Diffusion Load Subject (1), its subject probed (2)."""
    g = Graph()
    probe(g, "2", probe_name, subject=g.add("BlipDiffusionLoadSubject", "1", subject_file=subject_file))
    return g


def previewed(class_type: str, output: int = 0, **inputs) -> Graph:
    """One node (1) whose output `output` a PreviewAny (2) shows: the cheapest graph that runs e.g. a loader."""
    g = Graph()
    g.add("PreviewAny", "2", source=[g.add(class_type, "1", **inputs)[0], output])
    return g


def edges(class_type: str, image: str, prefix: str = "edges", **inputs) -> Graph:
    """LoadImage (1) -> an edge preprocessor (2) -> SaveImage (3)."""
    g = Graph()
    g.add(
        "SaveImage",
        "3",
        images=g.add(class_type, "2", image=g.add("LoadImage", "1", image=image), **inputs),
        filename_prefix=prefix,
    )
    return g


def probe(graph: Graph, node_id: str | None, name: str, **sockets) -> Graph:
    """Add a ProbeSaveTensors node (tests/comfy/probe_pack) that saves what flows through `sockets`
    (`node_id` None: numbered after the others)."""
    graph.add("ProbeSaveTensors", node_id, name=name, **sockets)
    return graph
