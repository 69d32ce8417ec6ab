"""The diffusers reference, timed on request: runs in the reference venv (see bench/run.py).

Reads one JSON command per line on stdin, answers one JSON line on stdout:
    {"op": "load", "model": DIR, "device": "cpu", "dtype": "fp32"} -> {"seconds": ...}
    {"op": "encode", "batch": 4}                                   -> {"seconds": ..., "embeds": sha}
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BERT_VOCAB = ROOT / "blip_core" / "assets" / "bert-base-uncased-vocab.txt"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Reference:
    def load(self, model: str, device: str = "cpu", dtype: str = "fp32") -> dict:
        from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
        from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
        from transformers import Blip2Config

        start = time.perf_counter()
        model = Path(model)
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        with tempfile.TemporaryDirectory() as vocab:
            shutil.copy(BERT_VOCAB, Path(vocab) / "vocab.txt")
            config = Blip2Config.from_pretrained(model / "qformer")
            config.tokenizer = vocab
            self.qformer = Blip2QFormerModel.from_pretrained(model / "qformer", config=config,
                                                             torch_dtype=self.dtype).to(self.device).eval()
        self.processor = BlipImageProcessor.from_pretrained(model / "image_processor")
        index = json.loads((model / "model_index.json").read_text())
        self.mean, self.std = index["mean"], index["std"]
        return {"seconds": time.perf_counter() - start}

    @torch.no_grad()
    def encode(self, batch: int) -> dict:
        """What BlipDiffusionPipeline does for the subject: preprocess, then the Q-Former (+ projection)."""
        images = [Image.fromarray(a) for a in bench_images(batch)]
        sync(self.device)
        start = time.perf_counter()
        pixels = self.processor.preprocess(images, image_mean=self.mean, image_std=self.std,
                                           return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        out = self.qformer(image_input=pixels, text_input=["dog"] * batch, return_dict=False)
        sync(self.device)
        return {"seconds": time.perf_counter() - start, "embeds": digest(out)}


def bench_images(batch: int) -> list[np.ndarray]:
    """The same 512x512 photos-to-be for both sides (bench/run.py uses this function too)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(batch)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.float().cpu().numpy().round(3).tobytes()).hexdigest()[:12]


def main() -> None:
    ref = Reference()
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        print(json.dumps(getattr(ref, op)(**cmd)), flush=True)


if __name__ == "__main__":
    main()
