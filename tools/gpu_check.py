"""`make gpu-check`: the pack's GPU numbers in one call, as one markdown table.

    python tools/gpu_check.py [--dry-run] [--repeats N] [--out FILE]

`make gpu-check` first sets up both venvs (on a fresh machine: torch from PyPI, whose Linux wheels carry CUDA, a
real ComfyUI and the pinned diffusers reference), then runs this. On full-size random weights in the released
layout (fp16 pickles, generated once into .cache/gpu_check/):
  (a) end-to-end parity: the zero-shot graph through a real ComfyUI on the GPU (its fp16 defaults) against the
      diffusers pipeline on the GPU in fp16, same weights, photo, prompt and seed: mean |Δ| of the 8-bit images;
  (b) the bench at 512x512, 25 steps, CFG 7.5: seconds per image and it/s of each side (the whole image: subject
      encoding, prompts, sampling, decode), subject-encoding and conditioning time, and each side's peak GPU
      memory (PyTorch's reserved memory: the pack's sampled from ComfyUI's /system_stats while it runs, the
      reference's from torch.cuda.max_memory_reserved);
  (c) the same image with the ControlNet.
Timing as in bench/run.py (which this reuses): the pack as users run it in a real server, the reference as a
worker process, alternating, medians of --repeats runs after a warm-up.

--dry-run: every step on the CPU at tiny sizes (tiny model, 64x64, 2 steps, fp32, one repeat), so the tests
prove the script works on machines without a GPU (tests/comfy/test_gpu_check.py). Its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from blip_diffusion_nodes.bench.run import MODEL, PROBE_PACK, Pack, ReferenceWorker, measure, reference
from blip_diffusion_nodes.tests.graphs import NEGATIVE, zero_shot
from blip_diffusion_nodes.tools.comfy_server import ComfyServer, prepare_base
from blip_diffusion_nodes.tools.make_tiny_model import make_model

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "gpu_check"
SUBJECT = "bench_subject.png"  # the photo bench/run.py's Pack puts in ComfyUI's input folder


class PeakVram:
    """The highest PyTorch-reserved GPU memory ComfyUI reports (/system_stats) while the block runs; None on the
    CPU. Sampled every 50 ms: a peak shorter than that can be missed, so it is a lower bound."""

    def __init__(self, comfy):
        self.comfy, self.peak, self._stop = comfy, None, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            devices = self.comfy.get_json("/system_stats")["devices"]
            reserved = [d["torch_vram_total"] for d in devices if d.get("type") == "cuda"]
            if reserved:
                self.peak = max(self.peak or 0, *reserved)
            self._stop.wait(0.05)

    def __enter__(self) -> PeakVram:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def model_folder(dry_run: bool) -> Path:
    """Random weights of the released shapes and layout (pickle .bin files, with the ControlNet), made once."""
    folder = CACHE / ("tiny" if dry_run else "full")
    if not (folder / "model_index.json").is_file():
        print(f"generating random weights in {folder} ...", flush=True)
        make_model(
            folder,
            size="tiny" if dry_run else "full",
            dtype="fp32" if dry_run else "fp16",
            fmt="bin",
            controlnet=True,
        )
    return folder


def parity(comfy, model: Path, device: str, dtype: str, size: int, steps: int) -> float:
    """Mean |Δ| (of 255) between the pack's and the reference's 8-bit image of the same zero-shot request."""
    settings = dict(prompt="swimming underwater", negative=NEGATIVE, seed=7, steps=steps, size=size)
    entry = comfy.run_ok(zero_shot(MODEL, image=SUBJECT, subject="dog", prefix="gpu_check", **settings), 3600)
    ours = comfy.image(entry, "9").astype(np.float64)
    python = os.environ.get("REFERENCE_PYTHON", str(ROOT / ".refvenv" / "bin" / "python"))
    with tempfile.TemporaryDirectory() as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "reference.npz"
        request.write_text(
            json.dumps(
                dict(
                    model=str(model),
                    image=str(comfy.base / "input" / SUBJECT),
                    subject="dog",
                    target="dog",
                    prompt=settings["prompt"],
                    negative=settings["negative"],
                    seed=settings["seed"],
                    steps=steps,
                    guidance=7.5,
                    height=size,
                    width=size,
                    strength=1.0,
                    reps=20,
                    control_image=None,
                    device=device,
                    dtype=dtype,
                )
            )
        )
        script = ROOT / "tools" / "reference" / "run_pipeline.py"
        subprocess.run([python, str(script), str(request), str(out)], check=True, timeout=1800)
        image = np.load(out)["image"]
    # ComfyUI's SaveImage truncates to 8 bits: truncate the reference the same way
    theirs = np.clip(image * 255, 0, 255).astype(np.uint8).astype(np.float64)
    return float(np.abs(ours - theirs).mean())


def median(times: list[tuple[float, float]]) -> float:
    return statistics.median(wall for wall, _ in times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes: proves the script runs")
    parser.add_argument("--repeats", type=int, default=None, help="runs per measurement after a warm-up (3; 1 dry)")
    parser.add_argument("--out", type=Path, default=CACHE / "gpu_check.md", help="where the markdown table goes")
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device visible to torch: run with --dry-run to check the script on the CPU")
    device, dtype = ("cpu", "fp32") if dry else ("cuda", "fp16")
    size, steps, repeats = (64, 2, args.repeats or 1) if dry else (512, 25, args.repeats or 3)
    started = time.perf_counter()
    model = model_folder(dry)
    base = prepare_base(CACHE / ("comfy_dry" if dry else "comfy"), {"probe_pack": PROBE_PACK})
    link = base / "models" / "blip_diffusion" / MODEL  # the name bench/run.py's graphs load
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model, target_is_directory=True)
    ref = ReferenceWorker()
    rows = []
    try:
        with ComfyServer(base, cpu=dry) as comfy:
            pack = Pack(comfy, size, steps)
            delta = parity(comfy, model, device, dtype, size, steps)
            rows.append(
                f"| (a) end-to-end parity: mean abs diff of the 8-bit images, {size}x{size}, {steps} steps | "
                f"{delta:.2f} / 255 | - | - |"
            )
            ref_load = ref("load", model=str(model), device=device, dtype=dtype)["seconds"]
            rows.append(f"| model load, all components (s) | {pack.load()[0]:.2f} | {ref_load:.2f} | - |")

            def timed(name: str, pack_fn, ref_op: str, **ref_args) -> tuple[float, float]:
                ours, theirs = measure(repeats, pack_fn, lambda: reference(ref(ref_op, **ref_args)))
                a, b = median(ours), median(theirs)
                rows.append(f"| {name} (s) | {a:.3f} | {b:.3f} | {a / b:.2f} |")
                return a, b

            encode = timed("(b) subject encoding, batch 1", lambda: pack.encode(1), "encode", batch=1)
            condition = timed(
                "(b) conditioning (prompt with the subject)", pack.conditioning, "conditioning", prompt="x"
            )
            with PeakVram(comfy) as vram:
                image = timed(
                    f"(b) one image {size}x{size}, {steps} steps, CFG 7.5",
                    lambda: pack.generate(False),
                    "generate",
                    size=size,
                    steps=steps,
                )
                control = timed(
                    "(c) the same with the ControlNet",
                    lambda: pack.generate(True),
                    "generate",
                    size=size,
                    steps=steps,
                    controlnet=True,
                )
            for name, (a, b) in (("no ControlNet", image), ("with the ControlNet", control)):
                rows.append(f"| it/s, {name} (steps / whole image) | {steps / a:.2f} | {steps / b:.2f} | - |")
            share = [(e + c) / i * 100 for e, c, i in zip(encode, condition, image)]
            rows.append(f"| subject encoding + conditioning, % of one image | {share[0]:.1f} | {share[1]:.1f} | - |")
            ref_vram = ref("peak_vram")["bytes"]
            if vram.peak is None:  # the CPU: no GPU memory to report
                rows.append("| peak GPU memory, reserved (GB) | - | - | - |")
            else:
                rows.append(
                    f"| peak GPU memory, reserved (GB) | {vram.peak / 1e9:.2f} | {ref_vram / 1e9:.2f} | "
                    f"{vram.peak / ref_vram:.2f} |"
                )
    finally:
        ref.close()
    gpu = torch.cuda.get_device_name(0) if not dry else f"none (dry run on the CPU: {platform.processor() or 'cpu'})"
    table = "\n".join(
        [
            f"GPU check ({'DRY RUN: tiny model, numbers meaningless' if dry else 'full-size random weights, fp16'}): "
            f"GPU {gpu}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s in all; "
            f"times are medians of {repeats} run(s) after a warm-up.",
            "",
            "| measurement | pack | reference | pack/reference |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n")
    print("\n" + table, flush=True)


if __name__ == "__main__":
    main()
