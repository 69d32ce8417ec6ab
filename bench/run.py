"""`make bench`: the pack against the real diffusers reference, same machine, same weights, one run.

    python bench/run.py [--device cpu|cuda] [--repeats 3]

Random full-size weights in the released layout are generated once into .cache/bench/.
The reference runs in its pinned venv as a worker process (bench/reference_worker.py);
measurements alternate pack / reference so both see the same machine load. Each row is
the median of --repeats runs after one warm-up, with the spread (min-max) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(ROOT / "bench")]

from make_tiny_model import make_model  # noqa: E402
from reference_worker import bench_images, sync  # noqa: E402

import blip_core  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def full_model() -> Path:
    """Released shapes, fp32 safetensors (what both sides read), made once."""
    folder = CACHE / "blipdiffusion-full"
    if not (folder / "model_index.json").is_file():
        print(f"generating full-size random weights in {folder} (once) ...", flush=True)
        make_model(folder, size="full", dtype="fp32", controlnet=True)
    return folder


class ReferenceWorker:
    def __init__(self):
        python = os.environ.get("REFERENCE_PYTHON", str(ROOT / ".refvenv" / "bin" / "python"))
        self.proc = subprocess.Popen([python, str(ROOT / "bench" / "reference_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def __call__(self, op: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the reference worker died (see its stderr above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Pack:
    """The pack's core, in this process."""

    def load(self, model: Path, device: str, dtype: str) -> float:
        start = time.perf_counter()
        self.device = torch.device(device)
        self.encoder = blip_core.load_subject_encoder(model, device=self.device, dtype=DTYPES[dtype])
        return time.perf_counter() - start

    def encode(self, batch: int) -> float:
        images = torch.from_numpy(np.stack(bench_images(batch))).float() / 255
        sync(self.device)
        start = time.perf_counter()
        self.encoder.encode(images, "dog", device=self.device)
        sync(self.device)
        return time.perf_counter() - start


def timed(repeats: int, pack_fn, ref_fn) -> tuple[list[float], list[float]]:
    pack_fn(), ref_fn()  # warm-up
    pack, ref = [], []
    for _ in range(repeats):
        pack.append(pack_fn())
        ref.append(ref_fn())
    return pack, ref


def row(name: str, pack: list[float], ref: list[float]) -> str:
    p, r = statistics.median(pack), statistics.median(ref)
    spread = lambda xs: f"{min(xs):.3f}-{max(xs):.3f}"  # noqa: E731
    return f"| {name} | {p:.3f} ({spread(pack)}) | {r:.3f} ({spread(ref)}) | {p / r:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: fp32 on the CPU, fp16 on a GPU")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    model = full_model()
    torch.set_grad_enabled(False)
    pack, ref = Pack(), ReferenceWorker()
    try:
        rows = [f"| subject encoder load | {pack.load(model, args.device, dtype):.2f} | "
                f"{ref('load', model=str(model), device=args.device, dtype=dtype)['seconds']:.2f} | - |"]
        for batch in (1, 4):
            rows.append(row(f"subject encoding, batch {batch}", *timed(
                args.repeats, lambda: pack.encode(batch), lambda: ref("encode", batch=batch)["seconds"])))
    finally:
        ref.close()
    print(f"\ndevice {args.device}, {dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"seconds: median (min-max) of {args.repeats}\n")
    print("| measurement | pack | reference | pack/reference |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
