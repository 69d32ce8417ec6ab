"""A diffusers UNet2DConditionModel's noise prediction, with the weights of a LAVIS fine-tuned checkpoint loaded
into it directly (parity reference for BLIP-Diffusion LAVIS Fine-tuned Loader).

Runs in the reference venv only (diffusers 0.39.0 + transformers 4.53.3):

    .refvenv/bin/python tools/reference/run_unet.py REQUEST.json OUT.npz

REQUEST.json: {"model": dir (its unet/ is the base), "checkpoint": a LAVIS checkpoint_N.pth or null,
               "z": .npy [B,4,h,w], "t": .npy [B], "context": .npy [1, n, 768]}

The checkpoint's "model" tensors named unet.* replace the UNet's (load_state_dict, strict: every tensor must
fit); the file is read with torch.load(weights_only=True) (the pack's reader of pickles, blip_core.loading).

OUT.npz: eps, the UNet's output on (z, t, context).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from blip_diffusion_nodes.blip_core.loading import load_pickle


@torch.no_grad()
def main(request_file: Path, out: Path) -> None:
    from diffusers import UNet2DConditionModel

    req = json.loads(request_file.read_text())
    unet = UNet2DConditionModel.from_pretrained(Path(req["model"]) / "unet", torch_dtype=torch.float32)
    if req.get("checkpoint"):
        model = load_pickle(req["checkpoint"])["model"]
        unet.load_state_dict({k[len("unet.") :]: v for k, v in model.items() if k.startswith("unet.")}, strict=True)
    z, t, context = (torch.from_numpy(np.load(req[k])) for k in ("z", "t", "context"))
    eps = unet(z.float(), t.long(), context.float().expand(len(t), -1, -1)).sample
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, eps=eps.numpy())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
