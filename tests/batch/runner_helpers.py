"""Helpers for the batch runner's end-to-end tests: manifests, the runner's command line, its workers' processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from blip_diffusion_nodes.tools.comfy_server import comfyui_dir

ROOT = Path(__file__).resolve().parents[2]


def manifest_rows(count: int) -> list[dict]:
    """Rows in subject runs (cat, then cup), as a catalog has them: a worker re-encodes only on a change of subject."""
    return [
        {
            "image": f"{cat}.jpg",
            "category": cat,
            "prompt": ("on a beach", "in the snow")[i % 2],
            "seed": str(100 + i),
            "sku": f"SKU-{i:03d}",
        }
        for i, cat in enumerate(["cat"] * (count - count // 2) + ["cup"] * (count // 2))
    ]


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = list(rows[0])
    path.write_text("\n".join([",".join(columns)] + [",".join(r[c] for c in columns) for r in rows]) + "\n")
    return path


def runner_command(inputs: Path, manifest: Path, out: Path, base: Path, workers: int = 2, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "batch" / "run.py"),
        str(inputs / "workflow.json"),
        str(manifest),
        "--mapping",
        str(inputs / "mapping.json"),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--comfyui",
        str(comfyui_dir()),
        "--base-directory",
        str(base),
        "--no-progress-bar",
        # One torch thread a server: on a shared 2-core machine two threads were several times slower.
        "--cpus-per-worker",
        "1",
        *extra,
    ]


def run_runner(command: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    print(result.stdout, result.stderr)
    return result


def journal(out: Path) -> list[dict]:
    path = out / "batch_journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def done_keys(out: Path) -> list[str]:
    return [r["key"] for r in journal(out) if r["status"] == "done"]


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def worker_servers() -> list[tuple[psutil.Process, int, str]]:
    """(process, port, worker name) of every worker ComfyUI server: their output folders are the workers' scratch
    folders, blipd-batch-w<index>-..."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        scratch = next((c for c in cmd if "blipd-batch-w" in c), None)
        if "--port" in cmd and scratch:
            name = "w" + scratch.split("blipd-batch-w", 1)[1].split("-", 1)[0]
            found.append((p, int(cmd[cmd.index("--port") + 1]), name))
    return found


def executing(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/queue", timeout=2) as r:
            return bool(json.loads(r.read())["queue_running"])
    except OSError:
        return False
