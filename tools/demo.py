"""`make demo`: the zero-shot example workflow on a generated tiny model, in a headless ComfyUI.

    python tools/demo.py [--size 256] [--steps 10] [--full]
    python tools/demo.py --batch [--size 128] [--steps 4]     (`make batch-demo`)

Generates a random tiny BLIP-Diffusion model (once, under .cache/), starts ComfyUI on 127.0.0.1
with this pack, posts workflows/api/zero_shot.json, writes the PNG to ./output/ and stops.
The workflow holds the model card's values (512x512, 25 steps); on a CPU that takes minutes,
so by default the demo posts it at 256x256 with 10 steps (--full: exactly as saved).
The random model makes noise-like pictures: it proves the pipeline, not the art. For real
pictures put Salesforce/blipdiffusion in ComfyUI's models/blip_diffusion/ (see the README).
--batch runs the batch runner (batch/run.py) on the same model instead: the 8 rows of
batch/examples/subjects.csv on two local CPU workers, into ./output/batch/.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from blip_diffusion_nodes.batch import run as batch_run
from blip_diffusion_nodes.tests.graphs import shrink, twin
from blip_diffusion_nodes.tools.comfy_server import ComfyServer, comfyui_dir, prepare_base
from blip_diffusion_nodes.tools.make_tiny_model import make_model

ROOT = Path(__file__).resolve().parents[1]

CACHE = ROOT / ".cache" / "demo"


def main() -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--full", action="store_true", help="post the workflow exactly as saved (512x512, 25 steps)")
    parser.add_argument("--batch", action="store_true", help="run batch/examples/subjects.csv with the batch runner")
    args = parser.parse_args()
    base = prepare_base(CACHE / "comfy")
    model = base / "models" / "blip_diffusion" / "blipdiffusion"
    if not (model / "model_index.json").is_file():
        print("generating the tiny random model ...", flush=True)
        make_model(model, size="tiny")
    if args.batch:
        return batch_demo(base, args.size, args.steps)
    for image in (ROOT / "workflows" / "images").glob("*.jpg"):
        shutil.copy(image, base / "input" / image.name)
    prompt = twin("zero_shot")
    if not args.full:
        prompt = shrink(prompt, args.size, args.steps)
    print(
        "starting ComfyUI and running workflows/api/zero_shot.json"
        + ("" if args.full else f" at {args.size}x{args.size}, {args.steps} steps")
        + " ...",
        flush=True,
    )
    with ComfyServer(base) as comfy:
        start = time.monotonic()
        entry = comfy.run_ok(prompt, timeout=3600)
        seconds = time.monotonic() - start
        # the SaveImage's picture, not the Subject Encoder's preview of what it encoded (also an image output)
        saved = [node for node in entry["outputs"] if prompt[node]["class_type"] == "SaveImage"]
        image = next(info for node in saved for info in entry["outputs"][node].get("images", []))
        out = ROOT / "output" / Path(image["filename"]).name
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(comfy.view(image))
    print(f"wrote {out} in {seconds:.1f} s (random tiny model: expect noise, not a cat)")
    return out


def batch_demo(base: Path, size: int, steps: int) -> Path:
    """The batch runner's command line on the example manifest, as the README shows it."""
    out = ROOT / "output" / "batch"
    examples = ROOT / "batch" / "examples"
    code = batch_run.main(
        [
            str(ROOT / "workflows" / "api" / "zero_shot.json"),
            str(examples / "subjects.csv"),
            "--mapping",
            str(examples / "zero_shot.mapping.json"),
            *("--set", f"6.width={size}", "--set", f"6.height={size}", "--set", f"7.steps={steps}"),
            *("--comfyui", str(comfyui_dir()), "--base-directory", str(base)),
            *("--workers", "2", "--out", str(out)),
        ]
    )
    if code:
        raise SystemExit(code)
    return out


if __name__ == "__main__":
    main()
