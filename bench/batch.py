"""Batch runner throughput with 1 and 2 workers, and its overhead against posting the prompts by hand.

    python bench/batch.py [--jobs 16] [--size 64] [--steps 2] [--repeats 2] [--threads 1]

On this machine, with a generated tiny model (made once under .cache/bench_batch/), the same
manifest (two subject photos, two prompts, a seed per row) is rendered three ways, alternating
so all three see the same machine load:

- by hand: one ComfyUI server; for each job, upload its photo, post its prompt, poll /history,
  download the image and write it: one job after another, as a script posting to one server does.
  It runs at niceness 15, as the runner's servers do (Ray starts its workers at niceness 15 and a
  worker's ComfyUI inherits it): on a machine shared with other work, priority changes throughput;
- the runner (its command line, real Ray) with --workers 1, then --workers 2.

Every server has --threads torch threads (default 1: on a shared 2-core machine two threads per
server were several times slower than one). The job phase runs from the first prompt to the
last image written; server and Ray start-up are outside it in all three (and reported apart).
Printed: jobs/min of the job phase (median of --repeats), the 2-worker / 1-worker scaling, and
the runner's overhead per job: (runner with 1 worker - by hand) / jobs, also as a percentage of
the by-hand time per job. This machine is shared, so wall times move by +-15 % from run to run;
CPU time does not wait for a busy core, so the CPU seconds per job are also given, from the
first image written to the last: the ComfyUI servers', and the rest (by hand: the client; the
runner: its driver, Ray's processes and the worker actors). The CPU overhead is the runner's
rest minus the client's, per job, as a percentage of a server's CPU per job.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from blip_diffusion_nodes.batch.comfy import ComfyProcess, output_images
from blip_diffusion_nodes.batch.jobs import Mapping, load_workflow, plan_jobs, read_manifest
from blip_diffusion_nodes.tests.graphs import shrink, twin
from blip_diffusion_nodes.tools.comfy_server import comfyui_dir, prepare_base
from blip_diffusion_nodes.tools.make_tiny_model import make_model

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench_batch"
MAPPING = {"image": "Subject photo.image", "category": "3.subject", "prompt": "4.prompt", "seed": "7.seed"}
RAY_WORKER_NICENESS = 15  # Ray's default for its worker processes (config worker_niceness)


def prepare(jobs: int, size: int, steps: int) -> tuple[Path, Path, Path]:
    """(ComfyUI base folder with the tiny model, workflow file, manifest file)."""
    base = prepare_base(CACHE / "comfy")
    model = base / "models" / "blip_diffusion" / "blipdiffusion"
    if not (model / "model_index.json").is_file():
        print("generating the tiny random model (once) ...", flush=True)
        make_model(model, size="tiny")
    inputs = CACHE / "inputs"
    inputs.mkdir(exist_ok=True)
    workflow = shrink(twin("zero_shot"), size, steps)
    (inputs / "workflow.json").write_text(json.dumps(workflow, indent=1))
    (inputs / "mapping.json").write_text(json.dumps(MAPPING))
    subjects = [("cat", "blipd_example_cat.jpg"), ("cup", "blipd_example_cup.jpg")]
    for _, name in subjects:
        shutil.copy(ROOT / "workflows" / "images" / name, inputs / name)
    # Subject runs, as a catalog is ordered (a server re-encodes a subject only when it changes).
    lines = ["image,category,prompt,seed"] + [
        f"{subjects[i * 2 // jobs][1]},{subjects[i * 2 // jobs][0]},{('on a beach', 'in the snow')[i % 2]},{1000 + i}"
        for i in range(jobs)
    ]
    (inputs / "manifest.csv").write_text("\n".join(lines) + "\n")
    return base, inputs / "workflow.json", inputs / "manifest.csv"


def by_hand(base: Path, workflow: Path, manifest: Path, threads: int, out: Path) -> dict:
    """One server, one job at a time: upload, post, poll, download, write."""
    graph = load_workflow(workflow)
    header, rows = read_manifest(manifest)
    jobs, failures = plan_jobs(graph, Mapping(graph, MAPPING), rows, manifest.parent, header=header)
    assert not failures, failures
    with tempfile.TemporaryDirectory() as scratch:
        started = time.monotonic()
        server = ComfyProcess(
            comfyui_dir(),
            log_path=Path(scratch) / "comfyui.log",
            base_directory=base,
            output_directory=Path(scratch) / "output",
            cpu=True,
            threads=threads,
        )
        client = server.start()
        ready = time.monotonic()
        server_proc = psutil.Process(server.pid)
        cpu_first = None
        try:
            for n, job in enumerate(jobs):
                prompt = job.prompt
                for image in job.images:
                    prompt[image.node_id]["inputs"][image.input] = client.upload_image(
                        image.path.read_bytes(), image.path.name, "bench_by_hand"
                    )
                status, body = client.submit(prompt)
                assert status == 200, body
                # A script waiting for one job polls quickly: a slow poll would leave the server idle.
                entry = client.wait(body["prompt_id"], 600, alive=server.alive, max_poll=0.05)
                assert entry["status"]["status_str"] == "success", entry["status"]
                for i, (_, info) in enumerate(output_images(entry)):
                    (out / f"{job.name}_{i:02d}.png").write_bytes(client.view(info))
                if n == 0:
                    cpu_first = (_cpu(server_proc), time.process_time())
            finished = time.monotonic()
            server_cpu, client_cpu = _cpu(server_proc) - cpu_first[0], time.process_time() - cpu_first[1]
        finally:
            server.stop()
    shutil.rmtree(base / "input" / "bench_by_hand", ignore_errors=True)
    return {
        "startup_s": ready - started,
        "jobs_s": finished - ready,
        "jobs": len(jobs),
        "server_cpu": server_cpu / (len(jobs) - 1),
        "rest_cpu": client_cpu / (len(jobs) - 1),
    }


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


class TreeCPU(threading.Thread):
    """CPU seconds of a process tree between the first and the last image in `out` (ComfyUI servers apart)."""

    def __init__(self, root: psutil.Process, out: Path, images: int):
        super().__init__(daemon=True)
        self.root, self.out, self.images = root, out, images
        self.snapshots: list[dict[int, tuple[str, float]]] = []

    def snapshot(self) -> dict[int, tuple[str, float]]:
        seen = {}
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                kind = "server" if any("blipd-batch-w" in c for c in p.cmdline()) else "rest"
                seen[p.pid] = (kind, _cpu(p))
            except psutil.Error:
                pass
        return seen

    def run(self) -> None:
        latest: dict[int, tuple[str, float]] = {}  # a process that ended keeps its last reading
        while self.root.is_running() and len(self.snapshots) < 2:
            for pid, (kind, seconds) in self.snapshot().items():
                # A server that ended is a zombie with an empty command line until reaped: it stays a server.
                latest[pid] = (latest.get(pid, (kind,))[0] if kind == "rest" else kind, seconds)
            written = len(list(self.out.glob("*.png")))
            if (written >= 1 and not self.snapshots) or written >= self.images:
                self.snapshots.append(dict(latest))
            time.sleep(0.1)

    def per_job(self) -> dict[str, float]:
        first, last = self.snapshots
        cpu = {"server": 0.0, "rest": 0.0}
        for pid, (kind, seconds) in last.items():
            cpu[kind] += seconds - first.get(pid, (kind, 0.0))[1]
        return {f"{kind}_cpu": seconds / (self.images - 1) for kind, seconds in cpu.items()}


def runner(base: Path, workflow: Path, manifest: Path, threads: int, workers: int, out: Path) -> dict:
    """The runner's command line, as a user runs it."""
    command = [
        sys.executable,
        str(ROOT / "batch" / "run.py"),
        str(workflow),
        str(manifest),
        "--mapping",
        str(manifest.parent / "mapping.json"),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--cpus-per-worker",
        str(threads),
        "--comfyui",
        str(comfyui_dir()),
        "--base-directory",
        str(base),
        "--no-progress-bar",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    jobs = len(read_manifest(manifest)[1])
    cpu = TreeCPU(psutil.Process(proc.pid), out, jobs)
    cpu.start()
    output, _ = proc.communicate()
    cpu.join()
    if proc.returncode != 0:
        raise RuntimeError(f"runner failed ({proc.returncode}):\n{output[-3000:]}")
    summary = json.loads((out / "batch_summary.json").read_text())
    assert summary["done"] == jobs, summary
    return {
        "startup_s": summary["wall_s"] - summary["jobs_s"],
        "jobs_s": summary["jobs_s"],
        "jobs": jobs,
        **cpu.per_job(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per ComfyUI server")
    args = parser.parse_args()
    base, workflow, manifest = prepare(args.jobs, args.size, args.steps)
    results: dict[str, list[dict]] = {"by hand, 1 server": [], "runner, 1 worker": [], "runner, 2 workers": []}
    print(
        f"{args.jobs} jobs, {args.size}x{args.size}, {args.steps} steps, {args.threads} thread(s) per server, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    for repeat in range(args.repeats):
        for name in results:
            out = Path(tempfile.mkdtemp(prefix="bench_batch_out_"))
            try:
                if name.startswith("by hand"):
                    with multiprocessing.get_context("spawn").Pool(
                        1, initializer=os.nice, initargs=(RAY_WORKER_NICENESS,)
                    ) as pool:
                        r = pool.apply(by_hand, (base, workflow, manifest, args.threads, out))
                else:
                    r = runner(base, workflow, manifest, args.threads, int(name.split(", ")[1][0]), out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            r["load"] = os.getloadavg()[0]
            results[name].append(r)
            print(
                f"  run {repeat + 1} {name}: job phase {r['jobs_s']:.1f} s "
                f"({r['jobs'] / r['jobs_s'] * 60:.1f} jobs/min), start-up {r['startup_s']:.1f} s, CPU per job: "
                f"servers {r['server_cpu']:.2f} s, rest {r['rest_cpu']:.3f} s; load {r['load']:.1f}",
                flush=True,
            )

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    median = {name: med(name, "jobs_s") for name in results}
    print(
        "\n| | job phase (s) | jobs/min | start-up (s) | CPU/job, servers (s) | CPU/job, client or runner+Ray (s) |"
        "\n|---|---|---|---|---|---|"
    )
    for name in results:
        print(
            f"| {name} | {median[name]:.1f} | {args.jobs / median[name] * 60:.1f} | {med(name, 'startup_s'):.1f} "
            f"| {med(name, 'server_cpu'):.2f} | {med(name, 'rest_cpu'):.3f} |"
        )
    hand, one, two = median.values()
    print(f"\nscaling, 2 workers / 1 worker: {one / two:.2f}x")
    print(
        f"runner overhead per job (1 worker vs by hand): {(one - hand) / args.jobs * 1000:+.0f} ms "
        f"= {(one - hand) / hand * 100:+.1f} % of the by-hand time per job ({hand / args.jobs:.2f} s)"
    )
    paired = [
        (r1["jobs_s"] - h["jobs_s"]) / h["jobs_s"] * 100
        for h, r1 in zip(results["by hand, 1 server"], results["runner, 1 worker"])
    ]
    print(
        f"paired wall-time overhead per repeat: {', '.join(f'{p:+.1f} %' for p in paired)} "
        f"(median {statistics.median(paired):+.1f} %)"
    )
    extra = med("runner, 1 worker", "rest_cpu") - med("by hand, 1 server", "rest_cpu")
    print(
        f"CPU overhead per job (runner+Ray minus the by-hand client): {extra * 1000:+.0f} ms "
        f"= {extra / med('by hand, 1 server', 'server_cpu') * 100:+.1f} % of a server's CPU per job"
    )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
