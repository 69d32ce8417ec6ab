"""`make bench`: the pack against the real diffusers reference, same machine, same weights, one run.

    python bench/run.py [--device cpu|cuda] [--repeats 3] [--size N] [--steps N] [--only encode,invert,...]
                        [--weights full|edit]

Random full-size weights in the released layout (with a ControlNet) are generated once into
.cache/bench/. The pack runs as users run it: the example graph in a real ComfyUI server
(default flags; the time is ComfyUI's own execution time of each prompt, from /history).
The reference runs in its pinned venv as a worker process (bench/reference_worker.py).
Measurements alternate pack / reference so both see the same machine load; each row gives the
median wall time of --repeats runs after one warm-up with the spread (min-max), the median
of the paired wall-time ratios, and the median ratio of the processes' CPU time (which
waiting for a busy CPU does not inflate). Every pack run changes an input of the measured
nodes, so ComfyUI's cache never skips the work.

CPU defaults: 256x256, 10 steps, fp32. --device cuda: 512x512, 25 steps, fp16, plus it/s.

`finetune`: seconds per training step of BlipDiffusionFinetune against LAVIS's loop on diffusers' parts
(tools/reference/run_finetune.py), the same weights, photos, batch (--batch, the original's 3) and size: each
side's run of 1 + 2 steps minus its run of 1 step, halved, so setup (the photos' latents, copies of the weights)
is left out. The peak resident memory of each mode's 1-step run (the server's and the worker's, reset before it):
`subject`, `lora+subject` (the pack only; the reference has no LoRA) and `unet+subject` (--train picks). The
pack's runs come first; the reference's once the server has stopped, so neither side holds the other's memory (not
alternating, unlike the other rows). A run that would leave the machine under 1 GB free is stopped and reported as
not fitting. `--repeats 0` measures the peaks only.

`edit` compares the pack with itself: a subject-driven edit (two rows, Prompt-to-Prompt with LocalBlend) against
a plain generation of two images (batch 2) on the same weights, sampler, size and steps: the cost of the
attention control. It needs no reference, so `--only edit` starts none. `--weights edit` measures on the
`edit` test model (SD-1.5's layout at width 320, 1.2 GB) instead of the full-size weights (10 GB).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil

from blip_diffusion_nodes.bench.reference_worker import NEGATIVE, bench_images, control_image
from blip_diffusion_nodes.tests.graphs import Graph, probe
from blip_diffusion_nodes.tools.comfy_server import ComfyServer, prepare_base
from blip_diffusion_nodes.tools.make_tiny_model import make_model

ROOT = Path(__file__).resolve().parents[1]

CACHE = ROOT / ".cache" / "bench"
MODEL = "blipdiffusion-full"
WEIGHTS = {"full": (MODEL, "full"), "edit": ("blipdiffusion-edit", "edit")}  # --weights: folder, make_model size
PROBE_PACK = ROOT / "tests" / "comfy" / "probe_pack"


def bench_model(weights: str = "full") -> Path:
    """Random weights of the released layout, fp32 safetensors (what both sides read), made once: full size
    (with a ControlNet) or the `edit` test model."""
    name, size = WEIGHTS[weights]
    folder = CACHE / name
    if not (folder / "model_index.json").is_file():
        print(f"generating {size}-size random weights in {folder} (once) ...", flush=True)
        make_model(folder, size=size, dtype="fp32", controlnet=size == "full")
    return folder


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid: int) -> None:
    """Starts the process's VmHWM again from its current resident memory (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class MemoryGuard:
    """Kills `pid`'s process group if the machine's available memory falls under `floor` bytes while the block
    runs (a measurement that does not fit must not take the machine down); `.fired` says whether it did."""

    def __init__(self, pid: int, floor: int = 1 << 30):
        self.pid, self.floor, self.fired = pid, floor, False
        self.done = threading.Event()
        self.watcher = threading.Thread(target=self.watch, daemon=True)

    def watch(self) -> None:
        while not self.done.wait(0.05):
            if psutil.virtual_memory().available < self.floor:
                self.fired = True
                os.killpg(self.pid, signal.SIGKILL)
                return

    def __enter__(self) -> MemoryGuard:
        self.watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.watcher.join()


class ReferenceWorker:
    def __init__(self):
        python = os.environ.get("REFERENCE_PYTHON", str(ROOT / ".refvenv" / "bin" / "python"))
        self.proc = subprocess.Popen(
            [python, str(ROOT / "bench" / "reference_worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a MemoryGuard may kill its process group, not the bench's
        )

    def __call__(self, op: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the reference worker died (see its error above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


class Pack:
    """The pack's example graph in a real ComfyUI; every call varies an input so nothing is cached."""

    def __init__(self, comfy, size: int, steps: int, model: str = MODEL):
        self.comfy, self.size, self.steps, self.model = comfy, size, steps, model
        self.server = psutil.Process(comfy.pid)
        self.variant = itertools.count()
        comfy.put_input("bench_subject.png", bench_images(1)[0])
        for i, photo in enumerate(bench_images(3)):
            comfy.put_input(f"bench_photo_{i}.png", photo)
        comfy.put_input("bench_control.png", control_image(size))

    def seconds(self, prompt: dict) -> tuple[float, float]:
        """ComfyUI's execution time of the prompt (execution_start -> execution_success), and the
        server process's CPU time meanwhile."""
        before = sum(self.server.cpu_times()[:2])
        entry = self.comfy.run_ok(prompt, timeout=7200)
        stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
        return (stamps["execution_success"] - stamps["execution_start"]) / 1000, sum(
            self.server.cpu_times()[:2]
        ) - before

    def graph(self, batch: int = 1, encoder_dtype: str = "auto") -> Graph:
        """Loader (1) -> subject (4) -> fused prompt (5); `batch` copies of the subject photo."""
        n = next(self.variant)
        g = Graph()
        loader = g.add("BlipDiffusionLoader", "1", model_name=self.model, weight_dtype="auto")[0]
        image = g.add("LoadImage", "2", image="bench_subject.png")
        if batch > 1:
            image = g.add("RepeatImageBatch", "3", image=image, amount=batch)
        encoder = [loader, 3]
        if encoder_dtype != "auto":
            encoder = g.add(
                "BlipDiffusionSubjectEncoderLoader", "15", model_name=self.model, weight_dtype=encoder_dtype
            )
        subject = g.add(
            "BlipDiffusionSubjectEncoder",
            "4",
            subject_encoder=encoder,
            image=image,
            subject="dog" + " " * n,
            preprocess="squash",
        )
        g.add(
            "BlipDiffusionMultimodalPromptFuse",
            "5",
            clip=[loader, 1],
            subject=subject,
            prompt="swimming underwater" + " " * n,
            target_subject="dog",
            prompt_strength=1.0,
            prompt_reps=20,
            multi_image="average",
            image_weights="",
        )
        return g

    def load(self) -> float:
        """The loader node (UNet, CLIP, VAE through ComfyUI's loaders, and the subject encoder)."""
        g = Graph({"1": self.graph()["1"]})
        decoded = g.add(
            "VAEDecode", "7", samples=g.add("EmptyLatentImage", "6", width=64, height=64, batch_size=1), vae=["1", 2]
        )
        g.add("PreviewImage", "8", images=decoded)
        return self.seconds(g)

    def encode(self, batch: int, encoder_dtype: str = "auto") -> float:
        g = self.graph(batch, encoder_dtype)
        del g["5"]
        return self.seconds(probe(g, "9", "bench_subject", subject=["4", 0]))

    def conditioning(self) -> float:
        g = self.graph()
        g["4"]["inputs"]["subject"] = "dog"  # cached: only the fuse runs
        return self.seconds(probe(g, "9", "bench_cond", conditioning=["5", 0]))

    def invert(self) -> float:
        """DDIM inversion of the photo at the bench size (the photo's VAE latent is cached after the warm-up;
        the prompt varies, so its encoding counts, as on the reference side)."""
        n = next(self.variant)
        g = Graph()
        loader = g.add("BlipDiffusionLoader", "1", model_name=self.model, weight_dtype="auto")[0]
        photo = g.add(
            "ImageScale",
            "3",
            image=g.add("LoadImage", "2", image="bench_subject.png"),
            upscale_method="bicubic",
            width=self.size,
            height=self.size,
            crop="center",
        )
        prompt = g.add("CLIPTextEncode", "5", clip=[loader, 1], text="a dog on the grass" + " " * n)
        inverted = g.add(
            "BlipDiffusionDDIMInversion",
            "6",
            model=[loader, 0],
            positive=prompt,
            latent=g.add("VAEEncode", "4", pixels=photo, vae=[loader, 2]),
            steps=self.steps,
            cfg=1.0,
        )
        return self.seconds(probe(g, "7", "bench_inverted", latent=inverted))

    def generate(self, controlnet: bool) -> float:
        g = self.graph()
        n = next(self.variant)
        positive = ["5", 0]
        negative = g.add("CLIPTextEncode", "6", clip=["1", 1], text=NEGATIVE + " " * n)
        if controlnet:
            apply = g.add(
                "BlipDiffusionControlNetApply",
                "12",
                positive=positive,
                negative=negative,
                control_net=g.add("BlipDiffusionControlNetLoader", "10", model_name=self.model),
                image=g.add("LoadImage", "11", image="bench_control.png"),
                strength=1.0,
                start_percent=0.0,
                end_percent=1.0,
            )[0]
            positive, negative = [apply, 0], [apply, 1]
        samples = g.add(
            "BlipDiffusionSampler",
            "8",
            model=["1", 0],
            positive=positive,
            negative=negative,
            latent_image=g.add("EmptyLatentImage", "7", width=self.size, height=self.size, batch_size=1),
            seed=n,
            steps=self.steps,
            cfg=7.5,
            sampler_name="pndm",
            scheduler="reference",
            denoise=1.0,
        )
        g.add(
            "SaveImage", "14", images=g.add("VAEDecode", "13", samples=samples, vae=["1", 2]), filename_prefix="bench"
        )
        return self.seconds(g)

    def finetune(self, steps: int, mode: str, batch: int) -> tuple[float, float]:
        """BlipDiffusionFinetune on the reference's three photos at the bench size; only the seed varies, so after
        the warm-up only the fine-tune runs (the photos' zero-shot subject is cached)."""
        g = Graph()
        loader = g.add("BlipDiffusionLoader", "1", model_name=self.model, weight_dtype="auto")[0]
        photos = [g.add("LoadImage", f"2{i}", image=f"bench_photo_{i}.png") for i in range(3)]
        images = g.add(
            "ImageBatch", "31", image1=g.add("ImageBatch", "30", image1=photos[0], image2=photos[1]), image2=photos[2]
        )
        subject = g.add(
            "BlipDiffusionSubjectEncoder",
            "4",
            subject_encoder=[loader, 3],
            image=images,
            subject="dog",
            preprocess="crop",
        )
        trained = g.add(
            "BlipDiffusionFinetune",
            "5",
            model=[loader, 0],
            clip=[loader, 1],
            vae=[loader, 2],
            subject=subject,
            images=images,
            category="dog",
            steps=steps,
            learning_rate=5e-6,
            batch_size=batch,
            weight_decay=0.01,
            train=mode,
            rank=8,
            seed=next(self.variant),
            resolution=self.size,
        )
        g.add("PreviewImage", "6", images=[trained[0], 2])  # the loss curve
        return self.seconds(g)

    def edit(self, sampler: str, patched: bool) -> tuple[float, float]:
        """An edit of two rows (Edit Prompt + Prompt-to-Prompt, LocalBlend on, from a latent of batch 1) or, not
        `patched`, a plain generation of two images (the Loader's MODEL, the Multimodal Prompt, a latent of
        batch 2): the same UNet batch of 4 per call. Only the seed varies, so only the sampler runs."""
        g = self.graph()
        g["4"]["inputs"]["subject"], g["5"]["inputs"]["prompt"] = "dog", "swimming underwater"  # cached
        negative = g.add("CLIPTextEncode", "6", clip=["1", 1], text=NEGATIVE)
        model, positive = ["1", 0], ["5", 0]
        if patched:
            del g["5"]
            positive = g.add(
                "BlipDiffusionEditPrompt",
                "20",
                clip=["1", 1],
                subject=["4", 0],
                source_subject="cat",
                prompt="swimming underwater",
                target_subject="dog",
                placeholder="lavis",
            )
            model = g.add(
                "BlipDiffusionPromptToPrompt",
                "21",
                model=["1", 0],
                edit=["20", 1],
                cross_replace=0.8,
                self_replace=0.4,
                local_blend=True,
                blend_threshold=0.3,
            )
        samples = g.add(
            "BlipDiffusionSampler",
            "8",
            model=model,
            positive=positive,
            negative=negative,
            latent_image=g.add(
                "EmptyLatentImage", "7", width=self.size, height=self.size, batch_size=1 if patched else 2
            ),
            seed=next(self.variant),
            steps=self.steps,
            cfg=7.5,
            sampler_name=sampler,
            scheduler="reference",
            denoise=1.0,
        )
        return self.seconds(probe(g, "9", "bench_edit", latent=samples))


def measure(repeats: int, pack_fn, ref_fn) -> tuple[list, list]:
    """[(wall, cpu)] of each side, alternating, after one warm-up of each."""
    pack_fn(), ref_fn()
    pack, ref = [], []
    for _ in range(repeats):
        pack.append(pack_fn())
        ref.append(ref_fn())
    return pack, ref


def reference(result: dict) -> tuple[float, float]:
    return result["seconds"], result["cpu"]


def row(name: str, pack: list, ref: list) -> str:
    """Median wall times (spread), and the ratios: median of the paired wall-time ratios (alternate runs
    share the machine's load) and of the CPU-time ratios (unaffected by waiting for the CPU)."""
    wall = lambda xs: [x[0] for x in xs]  # noqa: E731
    spread = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"  # noqa: E731
    paired = statistics.median(p[0] / r[0] for p, r in zip(pack, ref))
    cpu = statistics.median(p[1] / r[1] for p, r in zip(pack, ref))
    return (
        f"| {name} | {statistics.median(wall(pack)):.2f} ({spread(wall(pack))}) | "
        f"{statistics.median(wall(ref)):.2f} ({spread(wall(ref))}) | {paired:.2f} | {cpu:.2f} |"
    )


MEASUREMENTS = ("encode", "conditioning", "generate", "controlnet", "invert", "fp32", "edit", "finetune")
FINETUNE_MODES = ("subject", "lora+subject", "unet+subject")  # by the memory they need: one that does not fit is last
GB = 1e9


Trained = dict[str, tuple[float | None, list[tuple[float, float]]]]  # mode -> (peak GB or None, [(wall, cpu)])


def finetune_side(pid: int, run, modes: list[str], repeats: int) -> Trained:
    """One side's fine-tuning, mode by mode: the peak resident memory of a 1-step run (`run(steps, mode)`), then
    `repeats` measurements of a step, (a run of 3 steps - a run of 1) / 2. Stops at a run that does not fit (the
    guard killed the process: it is gone)."""
    results = {}
    for mode in modes:
        reset_peak_rss(pid)
        with MemoryGuard(pid) as guard:
            try:
                run(1, mode)
            except Exception:
                if not guard.fired:
                    raise
        if guard.fired:
            results[mode] = (None, [])
            break
        peak, steps = peak_rss(pid) / GB, []
        for _ in range(repeats):
            one, three = run(1, mode), run(3, mode)
            steps.append(((three[0] - one[0]) / 2, (three[1] - one[1]) / 2))
        results[mode] = (peak, steps)
    return results


def finetune_rows(pack: Trained, ref: Trained, size: str) -> list[str]:
    def shown(side: Trained, mode: str) -> str:
        if mode not in side:
            return "-"
        return "did not fit (stopped at 1 GB left free)" if side[mode][0] is None else f"{side[mode][0]:.2f}"

    rows = []
    for mode in (m for m in FINETUNE_MODES if m in pack):
        (pack_peak, pack_steps), (ref_peak, ref_steps) = pack[mode], ref.get(mode, (None, []))
        ratio = f"{pack_peak / ref_peak:.2f}" if pack_peak and ref_peak else "-"
        rows.append(f"| peak RSS, {mode}, {size} (GB) | {shown(pack, mode)} | {shown(ref, mode)} | {ratio} | - |")
        name = f"fine-tune step, {mode}, {size}"
        if pack_steps and ref_steps:
            rows.append(row(name, pack_steps, ref_steps))
        elif pack_steps:
            wall = [t[0] for t in pack_steps]
            rows.append(f"| {name} | {statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) | - | - | - |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--only",
        default=",".join(MEASUREMENTS),
        help=f"comma-separated measurements to run, of {', '.join(MEASUREMENTS)} (the model load, "
        "and peak memory, always when the reference runs)",
    )
    parser.add_argument("--batch", type=int, default=3, help="finetune: photos per training step (the original's 3)")
    parser.add_argument("--train", default=",".join(FINETUNE_MODES), help="finetune: the modes to measure")
    parser.add_argument("--weights", default="full", choices=list(WEIGHTS), help="full-size weights or the edit model")
    parser.add_argument("--server-args", default="", help="extra ComfyUI flags, e.g. --use-pytorch-cross-attention")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if args.repeats < 1 and only != {"finetune"}:
        parser.error("--repeats 0 (peaks only) is for --only finetune")
    modes = args.train.split(",")
    if set(modes) - set(FINETUNE_MODES):
        parser.error(f"--train: unknown modes {sorted(set(modes) - set(FINETUNE_MODES))}; choose from {FINETUNE_MODES}")
    if only - set(MEASUREMENTS):
        parser.error(f"--only: unknown measurements {sorted(only - set(MEASUREMENTS))}; choose from {MEASUREMENTS}")
    gpu = args.device == "cuda"
    size, steps = args.size or (512 if gpu else 256), args.steps or (25 if gpu else 10)
    model = bench_model(args.weights)
    base = prepare_base(CACHE / "comfy", {"probe_pack": PROBE_PACK})
    link = base / "models" / "blip_diffusion" / model.name
    if not link.exists():
        link.symlink_to(model, target_is_directory=True)
    ref = ReferenceWorker() if only - {"edit"} else None  # the edit rows compare the pack with itself
    rows, edit_rows, trained = [], [], {}
    try:
        with ComfyServer(base, args.server_args.split(), cpu=not gpu) as comfy:
            pack = Pack(comfy, size, steps, model.name)
            start = time.perf_counter()
            if ref is not None:
                ref_load = ref(
                    "load",
                    model=str(model),
                    device=args.device,
                    dtype="fp16" if gpu else "fp32",
                    controlnet="controlnet" in only,  # as the pack's server, which loads one only for those rows
                )
                rows.append(
                    f"| model load (all components) | {pack.load()[0]:.2f} | {ref_load['seconds']:.2f} | - | - |"
                )

            def measured(name: str, pack_fn, ref_op: str, **ref_args) -> tuple[list, list]:
                times = measure(args.repeats, pack_fn, lambda: reference(ref(ref_op, **ref_args)))
                rows.append(row(name, *times))
                return times

            if "encode" in only:
                for batch in (1, 4):
                    measured(f"subject encoding, batch {batch}", lambda b=batch: pack.encode(b), "encode", batch=batch)
            if "conditioning" in only:
                measured(
                    "conditioning (prompt with the subject)",
                    pack.conditioning,
                    "conditioning",
                    prompt="swimming underwater",
                )
            seeds = itertools.count()
            for controlnet in (False, True):
                if ("controlnet" if controlnet else "generate") not in only:
                    continue
                name = f"generation {size}x{size}, {steps} steps, CFG 7.5" + (", ControlNet" if controlnet else "")
                pack_times = measure(
                    args.repeats,
                    lambda c=controlnet: pack.generate(c),
                    lambda c=controlnet: reference(
                        ref("generate", size=size, steps=steps, controlnet=c, seed=next(seeds))
                    ),
                )
                rows.append(row(name, *pack_times))
                if gpu:
                    rows.append(
                        f"| it/s ({'with' if controlnet else 'no'} ControlNet) | "
                        f"{steps / statistics.median(t[0] for t in pack_times[0]):.1f} | "
                        f"{steps / statistics.median(t[0] for t in pack_times[1]):.1f} | - | - |"
                    )
            if "invert" in only:
                measured(
                    f"DDIM inversion {size}x{size}, {steps} steps, guidance 1",
                    pack.invert,
                    "invert",
                    size=size,
                    steps=steps,
                )
            if "edit" in only:
                for sampler in ("pndm", "reference_ddim"):
                    times = measure(
                        args.repeats, lambda s=sampler: pack.edit(s, True), lambda s=sampler: pack.edit(s, False)
                    )
                    edit_rows.append(row(f"edit {size}x{size}, {steps} steps, {sampler}", *times))
            if only - {"edit", "finetune"}:  # the finetune rows measure their own peaks
                pack_rss, ref_rss = peak_rss(comfy.pid), ref("peak_rss")["bytes"]
                rows.append(
                    f"| peak RSS (GB) | {pack_rss / 1e9:.2f} | {ref_rss / 1e9:.2f} | {pack_rss / ref_rss:.2f} | - |"
                )
            # The pack's CPU default is bfloat16 where the CPU has it: the same-precision row too (last: a second
            # subject encoder in the server would count in its peak memory above).
            if not gpu and "fp32" in only:
                measured(
                    "subject encoding, batch 1, pack forced to fp32", lambda: pack.encode(1, "fp32"), "encode", batch=1
                )
            # The reference's fine-tuning runs wait until this server is gone: neither side holds the other's memory.
            if "finetune" in only:
                trained["pack"] = finetune_side(
                    comfy.pid, lambda n, mode: pack.finetune(n, mode, args.batch), modes, args.repeats
                )
        if "finetune" in only:  # last: it trains the reference's UNet in place
            trained["reference"] = finetune_side(
                ref.proc.pid,
                lambda n, mode: reference(ref("finetune", size=size, steps=n, batch=args.batch, mode=mode)),
                [m for m in modes if m != "lora+subject"],  # the reference loop has no LoRA
                args.repeats,
            )
            rows += finetune_rows(trained["pack"], trained["reference"], f"batch {args.batch}, {size}x{size}")
    finally:
        if ref is not None:
            ref.close()
    precision = "fp16" if gpu else "reference fp32; pack: ComfyUI's CPU defaults, subject encoder weight_dtype auto"
    print(
        f"\n{args.device} ({precision}), {args.weights}-size random weights, ComfyUI flags: "
        f"{args.server_args or 'defaults'}; {time.perf_counter() - start:.0f} s; "
        f"seconds: median (min-max) of {args.repeats} after a warm-up\n"
    )
    if rows:
        print(
            "| measurement | pack (s) | reference (s) | pack/reference, wall | pack/reference, CPU time |\n"
            "|---|---|---|---|---|"
        )
        print("\n".join(rows))
    if edit_rows:
        print(
            "\n| measurement | edit, 2 rows (s) | plain, 2 images (s) | edit/plain, wall | edit/plain, CPU time |\n"
            "|---|---|---|---|---|"
        )
        print("\n".join(edit_rows))


if __name__ == "__main__":
    main()
