"""A batch worker: a Ray actor that owns one headless ComfyUI server on its node.

The actor runs two jobs at once (IN_FLIGHT): while ComfyUI executes one, the next one's images
are uploaded and its prompt is queued, so the server never waits for the driver. When the
server dies or hangs, the jobs in it come back as "lost" (the driver retries them, on any
worker) and the next job restarts the server. Results are plain dicts, never exceptions:

    {"status": "done", "images": [...], "timings": {...}, "worker": {...}}
    {"status": "invalid" | "error", "error": "..."}    the job's own fault: not retried
    {"status": "lost", "error": "..."}                  the server died or hung: retried
    {"status": "broken", "error": "..."}                the server cannot (re)start: the worker is dropped
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from blip_diffusion_nodes.batch.comfy import (
    ComfyError,
    ComfyProcess,
    ComfyUnreachable,
    describe_execution_error,
    describe_rejection,
    execution_seconds,
    output_images,
)

IN_FLIGHT = 2  # jobs per worker at once: one running in ComfyUI, one uploaded and queued behind it
UPLOADS = "blipd_batch"  # the workers' uploads go to input/blipd_batch/<worker>/, removed when the worker stops


@dataclass(frozen=True)
class WorkerSettings:
    comfyui_dir: str
    base_directory: str | None = None
    python: str | None = None  # the interpreter that runs ComfyUI; None: the worker's own
    comfy_args: tuple[str, ...] = ()
    cpu: bool = False
    threads: int | None = None
    job_timeout: float = 1800
    startup_timeout: float = 300
    max_server_starts: int = 6  # the first start and five restarts, then the worker gives up

    def input_directory(self) -> Path:
        """Where this ComfyUI reads LoadImage files from (main.py's own rule: --input-directory wins)."""
        args = list(self.comfy_args)
        for i, arg in enumerate(args):
            if arg == "--input-directory" and i + 1 < len(args):
                return Path(args[i + 1])
            if arg.startswith("--input-directory="):
                return Path(arg.split("=", 1)[1])
        return Path(self.base_directory or self.comfyui_dir) / "input"


class WorkerBroken(Exception):
    """This worker's server cannot be (re)started: the driver stops sending it jobs."""


@ray.remote(max_concurrency=IN_FLIGHT, concurrency_groups={"control": 1})
class ComfyWorker:
    """One ComfyUI server on this actor's node; `control` methods answer while two jobs run."""

    def __init__(self, index: int, settings: WorkerSettings):
        self.index, self.settings = index, settings
        self.scratch = Path(tempfile.mkdtemp(prefix=f"blipd-batch-w{index}-"))
        self.uploads = f"{UPLOADS}/{self.scratch.name}"
        self.output_dir = self.scratch / "output"
        self.process = ComfyProcess(
            settings.comfyui_dir,
            log_path=self.scratch / "comfyui.log",
            base_directory=settings.base_directory,
            output_directory=self.output_dir,
            temp_directory=self.scratch / "temp",
            python=settings.python or sys.executable,
            cpu=settings.cpu,
            threads=settings.threads,
            extra_args=settings.comfy_args,
            startup_timeout=settings.startup_timeout,
        )
        self.server_lock = threading.Lock()  # one thread (re)starts the server; the other waits for it
        self.upload_lock = threading.Lock()  # the same file is never uploaded by both threads at once
        self.uploaded: dict[str, str] = {}  # image sha256 -> the LoadImage value on this server
        # ComfyUI runs prompts in the order they were queued, so only the oldest job here needs to poll
        # /history: the other waits for its turn (tickets are taken in queueing order).
        self.turns = threading.Condition()
        self.next_ticket = self.serving = 0
        self.starts = 0
        self.broken: str | None = None

    def info(self) -> dict:
        gpus = ray.get_gpu_ids()
        return {
            "name": f"w{self.index}",
            "index": self.index,
            "host": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "device": f"GPU {','.join(map(str, gpus))}" if gpus else "CPU",
            "actor_pid": os.getpid(),
            "comfy_pid": self.process.pid,
            "server_starts": self.starts,
            "log": str(self.process.log_path),
        }

    def _client(self):
        with self.server_lock:
            if self.broken:
                raise WorkerBroken(self.broken)
            if self.process.alive() and self.process.client:
                return self.process.client, self.starts
            if self.starts >= self.settings.max_server_starts:
                self.broken = f"ComfyUI was started {self.starts} times; giving up on this worker"
                raise WorkerBroken(self.broken)
            self.starts += 1
            try:
                return self.process.start(), self.starts
            except ComfyError as e:
                self.broken = f"ComfyUI on {socket.gethostname()} did not start: {e}"
                raise WorkerBroken(self.broken) from None

    # The driver calls it again after a worker process died. Ray retries it for as long as the actor is being
    # restarted (max_restarts bounds that; a gone actor fails the call): a fixed count ran out on a busy machine,
    # where a restart takes longer, and left a healthy worker marked dead.
    @ray.method(max_task_retries=-1)
    def start(self, class_types: list[str]) -> dict:
        """Start the server (if it is not running); the node types of `class_types` it lacks are listed under
        "missing"."""
        try:
            client, _ = self._client()
            known = client.get_json("/object_info", timeout=120)
        except (WorkerBroken, ComfyError) as e:
            return {"status": "broken", "error": str(e)}
        return {**self.info(), "missing": sorted(set(class_types) - set(known))}

    def _upload(self, client, image: dict) -> str:
        with self.upload_lock:
            value = self.uploaded.get(image["sha256"])
            if value is None:
                data = ray.get(image["ref"])
                value = client.upload_image(data, image["sha256"][:24] + image["ext"], self.uploads)
                self.uploaded[image["sha256"]] = value  # files survive a server restart: no second upload
        return value

    def run(self, job: dict) -> dict:
        """Upload the job's images, post its prompt, wait, and return the images it saved (their bytes)."""
        started = time.monotonic()
        try:
            client, generation = self._client()
        except WorkerBroken as e:
            return {"status": "broken", "error": str(e), "worker": self.info()}
        prompt = job["prompt"]
        try:
            for image in job["images"]:
                prompt[image["node_id"]]["inputs"][image["input"]] = self._upload(client, image)
            uploaded = time.monotonic()
            posted_at = time.time()
            with self.turns:  # queueing and taking a ticket happen together, so tickets follow the queue
                status, body = client.submit(prompt)
                ticket = self.next_ticket
                if status == 200:
                    self.next_ticket += 1
            if status == 400:
                return {
                    "status": "invalid",
                    "worker": self.info(),
                    "error": "ComfyUI refused the prompt: " + describe_rejection(body, prompt, job["columns"]),
                }
            if status != 200:
                raise ComfyUnreachable(f"POST /prompt: HTTP {status}: {str(body)[:300]}")
            prompt_id = body["prompt_id"]
            entry = self._wait_in_turn(client, prompt_id, ticket)
            finished = time.monotonic()
            timings = {"upload_s": uploaded - started, "execute_s": execution_seconds(entry)}
            start_stamp = next(
                (d.get("timestamp") for k, d in entry["status"].get("messages", []) if k == "execution_start"), None
            )
            if start_stamp is not None:
                timings["queue_s"] = max(0.0, start_stamp / 1000 - posted_at)
            if entry["status"]["status_str"] != "success":
                client.forget(prompt_id)
                return {
                    "status": "error",
                    "error": describe_execution_error(entry),
                    "timings": timings,
                    "worker": self.info(),
                }
            images = []
            for node_id, info in output_images(entry):
                images.append(
                    {
                        "node": node_id,
                        "filename": info["filename"],
                        "data": client.view(info),
                        "ext": Path(info["filename"]).suffix or ".png",
                    }
                )
                # The driver writes the result; this server's copy in the worker's scratch folder goes.
                (self.output_dir / info.get("subfolder", "") / info["filename"]).unlink(missing_ok=True)
            client.forget(prompt_id)
        except ComfyUnreachable as e:
            return self._lost(str(e), generation)
        except ComfyError as e:
            return {"status": "error", "error": str(e), "worker": self.info()}
        if not images:
            return {
                "status": "error",
                "worker": self.info(),
                "error": "the workflow saved no images: it needs a SaveImage node (previews are not kept)",
            }
        timings.update(fetch_s=time.monotonic() - finished, job_s=time.monotonic() - started)
        return {"status": "done", "images": images, "timings": timings, "prompt_id": prompt_id, "worker": self.info()}

    def _wait_in_turn(self, client, prompt_id: str, ticket: int) -> dict:
        with self.turns:
            self.turns.wait_for(lambda: self.serving == ticket)
        try:
            return client.wait(prompt_id, self.settings.job_timeout, alive=self.process.alive, max_poll=0.5)
        finally:
            with self.turns:
                self.serving = ticket + 1
                self.turns.notify_all()

    def _lost(self, reason: str, generation: int) -> dict:
        code = None
        with self.server_lock:
            proc = self.process.proc
            if generation == self.starts and proc is not None:  # not yet replaced by the other thread
                try:
                    code = proc.wait(timeout=2)  # a killed server may not have been reaped yet
                except subprocess.TimeoutExpired:
                    self.process.stop(timeout=5)  # hung rather than dead: the next job starts a fresh server
            tail = self.process.log_tail(1500)
        state = f"exited with code {code}" if code is not None else "stopped answering"
        return {
            "status": "lost",
            "worker": self.info(),
            "log_tail": tail,
            "error": f"ComfyUI on worker w{self.index} {state} ({reason})",
        }

    @ray.method(concurrency_group="control")
    def stop(self) -> dict:
        """Stop the server and remove this worker's uploads and scratch folder."""
        info = self.info()
        with self.server_lock:
            self.broken = "stopped"
            self.process.stop()
        uploads = self.settings.input_directory() / self.uploads
        shutil.rmtree(uploads, ignore_errors=True)
        try:
            uploads.parent.rmdir()  # input/blipd_batch/ goes with the last worker's uploads
        except OSError:
            pass  # another worker (or run) still has uploads there
        shutil.rmtree(self.scratch, ignore_errors=True)
        return info
