"""Render a ComfyUI workflow over every row of a manifest, on Ray workers that each own a headless ComfyUI.

    python batch/run.py WORKFLOW MANIFEST --out DIR [--mapping FILE] [--map COLUMN=NODE.INPUT ...]
                        [--set NODE.INPUT=VALUE ...] [--workers N] [--address ADDR] [--comfyui DIR]
                        [--base-directory DIR] [--name TEMPLATE] [--retries N] [-- COMFYUI ARGS ...]

WORKFLOW is an API-format workflow (ComfyUI: Workflow > Export (API)), MANIFEST a .csv or .jsonl
file with one job a row. Columns name node inputs (NODE.INPUT: a node id, title or class type and
an input name) directly or through --mapping / --map; LoadImage `image` columns hold image paths
(relative to the manifest), which are uploaded. Each output image is written to DIR with a JSON
sidecar. Run it again with the same arguments to finish an interrupted run: done jobs are skipped.

Without --address (or $RAY_ADDRESS) Ray starts on this machine: one worker per GPU, or --workers N
on CPUs. With it, the same command spreads the workers over the cluster's GPUs.
Arguments after `--` go to every ComfyUI server (e.g. -- --highvram).

Exit status: 0 all done, 1 some rows failed, 2 nothing could run (bad workflow, manifest or
mapping), 3 the workers failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blip_diffusion_nodes.batch.comfy import ComfyError
from blip_diffusion_nodes.batch.jobs import DEFAULT_NAME, BatchError
from blip_diffusion_nodes.batch.runner import Options, run_batch

# The runner owns these: loopback on a free port, per-worker output and temp folders.
RESERVED_COMFY_ARGS = ("--listen", "--port", "--output-directory", "--temp-directory", "--base-directory", "--cpu")


def parse_args(argv: list[str] | None = None) -> Options:
    argv = list(sys.argv[1:] if argv is None else argv)
    comfy_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="batch/run.py",
        description=__doc__.split("\n\n")[0],
        epilog="The manifest and mapping format: see the README, section Rendering many subjects.",
    )
    p.add_argument("workflow", type=Path, help="API-format workflow JSON")
    p.add_argument("manifest", type=Path, help=".csv (with a header) or .jsonl, one job per row")
    p.add_argument("--out", type=Path, required=True, help="output folder (images, sidecars, journal)")
    p.add_argument("--mapping", type=Path, help='JSON file {"column": "NODE.INPUT", "metadata column": null}')
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="COLUMN=NODE.INPUT",
        help="map one column (COLUMN= keeps it as metadata only); repeatable, wins over --mapping",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.INPUT=VALUE",
        help="set an input for every job, e.g. --set 7.steps=10; repeatable",
    )
    p.add_argument(
        "--name",
        default=DEFAULT_NAME,
        help="output file name template: {row}, {key} (12 hex digits) and manifest columns "
        f"(default {DEFAULT_NAME!r}; files are NAME_00.png, NAME_00.json, ...)",
    )
    p.add_argument("--workers", type=int, help="number of workers (default: one per GPU, else 1)")
    p.add_argument(
        "--device",
        choices=["auto", "gpu", "cpu"],
        default="auto",
        help="GPU workers (one GPU each) or CPU workers; auto: GPUs when Ray sees any",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=int,
        help="CPU cores a worker asks Ray for (CPU workers also use it as their thread count); "
        "default: the cores divided among the workers, 1 for GPU workers",
    )
    p.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS; none: start Ray on this machine)")
    p.add_argument(
        "--comfyui",
        help="ComfyUI folder holding main.py (default $COMFYUI_DIR, else the ComfyUI this "
        "pack is installed in); must exist at the same path on every node",
    )
    p.add_argument(
        "--base-directory", help="ComfyUI's --base-directory (models, custom_nodes, input); default: the ComfyUI folder"
    )
    p.add_argument("--python", help="the Python that runs ComfyUI (default: the workers' own)")
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="retries of a job whose ComfyUI died or hung (default 2); bad inputs are never retried",
    )
    p.add_argument("--job-timeout", type=float, default=1800, help="seconds before a job counts as hung")
    p.add_argument("--startup-timeout", type=float, default=300, help="seconds for a ComfyUI server to start")
    p.add_argument(
        "--no-progress-bar",
        dest="progress",
        action="store_false",
        default=None,
        help="print a progress line every few seconds instead of a live bar",
    )
    a = p.parse_args(argv)
    for arg in comfy_args:
        if arg.split("=")[0] in RESERVED_COMFY_ARGS:
            p.error(f"{arg.split('=')[0]} is set by the runner (use --base-directory / --device for those)")
    if a.workers is not None and a.workers < 1:
        p.error("--workers must be at least 1")
    return Options(
        workflow=a.workflow,
        manifest=a.manifest,
        out=a.out,
        mapping=a.mapping,
        maps=a.map,
        sets=a.set,
        name=a.name,
        workers=a.workers,
        device=a.device,
        cpus_per_worker=a.cpus_per_worker,
        address=a.address,
        comfyui=a.comfyui,
        base_directory=a.base_directory,
        python=a.python,
        comfy_args=comfy_args,
        retries=a.retries,
        job_timeout=a.job_timeout,
        startup_timeout=a.startup_timeout,
        progress=a.progress,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    try:
        summary = run_batch(opts)
    except (BatchError, ComfyError) as e:
        print(f"batch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during planning or start-up, before any job ran
        return 130
    if summary["interrupted"]:
        return 130
    if summary.get("error"):
        return 3
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
