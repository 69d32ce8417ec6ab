"""API-format graph builders shared by the server tests."""

from __future__ import annotations

import json
from pathlib import Path

from workflows import shrink  # noqa: F401  (tools/workflows.py; tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
NEGATIVE = "over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped"


def twin(name: str) -> dict:
    """A committed API twin, workflows/api/<name>.json."""
    return json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())


def zero_shot(model: str, image: str = "blipd_example_cat.jpg", subject: str = "cat",
              prompt: str = "swimming underwater", target: str = "", negative: str = NEGATIVE, size: int = 128,
              steps: int = 3, seed: int = 0, cfg: float = 7.5, strength: float = 1.0, reps: int = 20,
              batch: int = 1, multi_image: str = "average", prefix: str = "zero_shot") -> dict:
    """Loader -> subject -> fused prompt (+ negative) -> BlipDiffusionSampler -> VAEDecode -> SaveImage."""
    return {
        "1": {"class_type": "BlipDiffusionLoader", "inputs": {"model_name": model, "weight_dtype": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "BlipDiffusionSubjectEncoder",
              "inputs": {"subject_encoder": ["1", 3], "image": ["2", 0], "subject": subject, "preprocess": "squash"}},
        "4": {"class_type": "BlipDiffusionMultimodalPromptFuse",
              "inputs": {"clip": ["1", 1], "subject": ["3", 0], "prompt": prompt, "target_subject": target,
                         "prompt_strength": strength, "prompt_reps": reps, "multi_image": multi_image}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": negative}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
        "7": {"class_type": "BlipDiffusionSampler",
              "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
                         "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "pndm", "scheduler": "reference",
                         "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def probe(graph: dict, node_id: str, name: str, **sockets) -> dict:
    """Add a ProbeSaveTensors node (tests/comfy/probe_pack) reading the given sockets."""
    graph[node_id] = {"class_type": "ProbeSaveTensors", "inputs": {"name": name, **sockets}}
    return graph
