"""The batch driver: plans the jobs, starts the Ray workers, hands out jobs, writes results, reports.

Ray places the workers (one per GPU, or --workers N on CPUs), carries images to them and
results back, and restarts a worker whose process died. The driver keeps IN_FLIGHT jobs on each
worker, retries a job whose server was lost (on any worker, up to --retries times), records a
job that failed for its own inputs without retrying it, and is the only writer of the output
folder.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from blip_diffusion_nodes.batch.comfy import find_comfyui
from blip_diffusion_nodes.batch.jobs import (
    DEFAULT_NAME,
    BatchError,
    Failure,
    Job,
    Mapping,
    apply_overrides,
    load_mapping,
    load_workflow,
    plan_jobs,
    read_manifest,
    workflow_sha256,
)
from blip_diffusion_nodes.batch.store import OutputStore

LOCAL_OBJECT_STORE = 512 * 1024**2  # images in flight and results on their way back; Ray spills to disk beyond


@dataclass
class Options:
    workflow: Path
    manifest: Path
    out: Path
    mapping: Path | None = None
    maps: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)
    name: str = DEFAULT_NAME
    workers: int | None = None
    device: str = "auto"  # auto | cpu | gpu
    cpus_per_worker: int | None = None
    address: str | None = None
    comfyui: str | None = None
    base_directory: str | None = None
    python: str | None = None
    comfy_args: list[str] = field(default_factory=list)
    retries: int = 2
    job_timeout: float = 1800
    startup_timeout: float = 300
    progress: bool | None = None  # None: a live bar on a terminal, a line every few seconds otherwise


@dataclass
class WorkerState:
    handle: Any
    name: str
    state: str = "starting"  # starting | ready | dead
    in_flight: int = 0
    info: dict = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    lost: int = 0
    actor_pids: set = field(default_factory=set)  # one per process Ray ran this worker in
    busy_s: float = 0.0
    images: int = 0
    error: str | None = None


class Progress:
    """One line: a bar, jobs done and failed, images/s, ETA. Redrawn in place on a terminal."""

    def __init__(self, total: int, stream: TextIO, live: bool | None):
        self.total, self.stream = total, stream
        self.live = stream.isatty() if live is None else live
        self.done = self.failed = self.images = 0
        self.started: float | None = None  # when the first job went out: start-up is not in the rates
        self.last = 0.0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.started is None or (not force and now - self.last < (0.5 if self.live else 10)):
            return
        self.last = now
        finished = self.done + self.failed
        elapsed = now - self.started
        rate = finished / elapsed if elapsed > 0 else 0
        eta = (self.total - finished) / rate if rate > 0 else None
        width = 24
        filled = int(width * finished / self.total) if self.total else width
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {finished}/{self.total} jobs: {self.done} done, "
            f"{self.failed} failed, {self.images / elapsed if elapsed > 0 else 0:.2f} images/s, "
            f"ETA {_clock(eta) if eta is not None else '?'}"
        )
        self.stream.write(("\r" + line + "\033[K") if self.live else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.update(force=True)
        if self.live and self.started is not None:
            self.stream.write("\n")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def plan(opts: Options) -> tuple[dict, list[Job], list[Failure]]:
    """The workflow (with --set), the jobs and the rows that cannot run. BatchError when nothing can."""
    workflow = apply_overrides(load_workflow(opts.workflow), opts.sets)
    mapping = Mapping(workflow, load_mapping(opts.mapping, opts.maps))
    header, rows = read_manifest(opts.manifest)
    jobs, failures = plan_jobs(workflow, mapping, rows, opts.manifest.resolve().parent, opts.name, header)
    return workflow, jobs, failures


def _start_ray(opts: Options) -> bool:
    """Connect to the cluster at --address / $RAY_ADDRESS, else start Ray on this machine. True if we started it."""
    if importlib.util.find_spec("ray") is None:
        raise BatchError("the batch runner needs Ray in this Python: pip install ray")
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        try:
            ray.init(address=address, logging_level="warning")
        except (ConnectionError, RuntimeError) as e:  # what ray.init raises when no cluster answers there
            raise BatchError(
                f"no Ray cluster answered at {address} ({str(e).splitlines()[0]}); check the address, and for a "
                "cluster with token authentication set RAY_AUTH_MODE=token and its token here (README: On a cluster)"
            ) from None
        return False
    # A local run needs no other machine: Ray's servers then listen on loopback only (Ray's own single-machine
    # mode, the default on macOS and Windows). It is read when ray is first imported, hence the late import.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    workers = opts.workers or 1
    ray.init(
        # "local": always a Ray of our own; without it ray.init() joins the last `ray start` cluster of this
        # machine (or, if that one has stopped, fails on the address it left in /tmp/ray)
        address="local",
        num_cpus=max(os.cpu_count() or 1, workers),
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE,
        logging_level="warning",
    )
    return True


def _layout(opts: Options) -> tuple[int, dict]:
    """How many workers, and the Ray resources each one asks for."""
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    use_gpu = opts.device == "gpu" or (opts.device == "auto" and gpus > 0)
    if use_gpu:
        if gpus == 0:
            raise BatchError("--device gpu: Ray sees no GPU on this machine or cluster")
        count = opts.workers or gpus
        if count > gpus:
            raise BatchError(f"--workers {count}: there are only {gpus} GPUs (one worker per GPU)")
        return count, {"num_gpus": 1, "num_cpus": opts.cpus_per_worker or 1}
    count = opts.workers or 1
    largest_node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    # CPU workers share their node's cores; the count given here becomes their torch thread count too.
    cpus = opts.cpus_per_worker or max(1, min(int(total.get("CPU", 1)) // count, int(largest_node)))
    return count, {"num_gpus": 0, "num_cpus": cpus}


def run_batch(opts: Options, stream: TextIO = sys.stderr) -> dict:
    """Run every job of the manifest that is not done yet; returns the summary (also written to the output folder).

    Raises BatchError before anything runs when the workflow, manifest or mapping cannot work at all.
    """
    began = time.monotonic()
    workflow, jobs, failures = plan(opts)
    comfyui = find_comfyui(opts.comfyui)
    wf_hash = workflow_sha256(workflow)
    store = OutputStore(opts.out)
    try:
        todo = [job for job in jobs if not store.is_done(job.key)]
        summary: dict[str, Any] = {
            "workflow": str(opts.workflow),
            "workflow_sha256": wf_hash,
            "manifest": str(opts.manifest),
            "rows": len(jobs) + len(failures),
            "skipped": len(jobs) - len(todo),
            "to_run": len(todo),
            "done": 0,
            "failed": len(failures),
            "not_run": len(todo),
            "interrupted": False,
            "started_at": _utc(),
            "failures": [],
            "workers": [],
        }
        for failure in failures:
            store.record_failure({"key": failure.key, "row": failure.row, "error": failure.message})
            summary["failures"].append({"row": failure.row, "error": failure.message, "values": failure.values})
        stream.write(
            f"{summary['rows']} rows: {len(todo)} to run, {summary['skipped']} already done, {len(failures)} bad\n"
        )
        for failure in failures:
            stream.write(f"  {failure.message}\n")
        if todo:
            _dispatch(opts, comfyui, workflow, wf_hash, todo, store, summary, stream)
        summary["wall_s"] = time.monotonic() - began
        store.write_summary(summary)
        print_summary(summary, stream)
        return summary
    finally:
        store.close()


def _job_payload(job: Job, image_refs: dict[str, Any]) -> dict:
    return {
        "key": job.key,
        "prompt": job.prompt,
        "columns": job.columns,
        "images": [
            {"node_id": i.node_id, "input": i.input, "sha256": i.sha256, "ext": i.ext, "ref": image_refs[i.sha256]}
            for i in job.images
        ],
    }


def _dispatch(
    opts: Options,
    comfyui: Path,
    workflow: dict,
    wf_hash: str,
    todo: list[Job],
    store: OutputStore,
    summary: dict,
    stream: TextIO,
) -> None:
    started_ray = _start_ray(opts)
    import ray
    from ray.exceptions import RayActorError, RayError

    from blip_diffusion_nodes.batch.worker import IN_FLIGHT, ComfyWorker, WorkerSettings

    # SIGTERM (a scheduler stopping the run) ends it like Ctrl-C: finished jobs are kept, the rest run next time.
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    workers: list[WorkerState] = []
    progress = Progress(len(todo), stream, opts.progress)
    jobs_began: float | None = None
    try:
        count, resources = _layout(opts)
        settings = WorkerSettings(
            comfyui_dir=str(comfyui),
            base_directory=opts.base_directory and str(Path(opts.base_directory).resolve()),
            python=opts.python,
            comfy_args=tuple(opts.comfy_args),
            cpu=resources["num_gpus"] == 0,
            threads=resources["num_cpus"] if resources["num_gpus"] == 0 else None,
            job_timeout=opts.job_timeout,
            startup_timeout=opts.startup_timeout,
        )
        class_types = sorted({node["class_type"] for node in workflow.values()})
        actor = ComfyWorker.options(max_restarts=2, **resources)
        stream.write(
            f"starting {count} worker{'s' if count > 1 else ''} "
            f"({'GPU' if resources['num_gpus'] else str(resources['num_cpus']) + ' CPU'} each), "
            f"ComfyUI {comfyui}\n"
        )
        calls: dict[Any, tuple[WorkerState, str, Job | None]] = {}  # Ray reference -> (worker, kind, job)
        for i in range(count):
            w = WorkerState(actor.remote(i, settings), f"w{i}")
            workers.append(w)
            calls[w.handle.start.remote(class_types)] = (w, "start", None)

        pending = deque(todo)
        attempts: dict[str, int] = {}
        uses: dict[str, int] = {}
        for job in todo:
            for image in job.images:
                uses[image.sha256] = uses.get(image.sha256, 0) + 1
        image_refs: dict[str, Any] = {}  # put into Ray's object store once per image, dropped after its last job

        def finish(job: Job) -> None:
            for image in job.images:
                uses[image.sha256] -= 1
                if uses[image.sha256] == 0:
                    image_refs.pop(image.sha256, None)

        def fail(job: Job, w: WorkerState | None, message: str) -> None:
            store.record_failure({"key": job.key, "row": job.row, "error": message, "worker": w and w.name})
            summary["failures"].append({"row": job.row, "key": job.key, "error": message, "values": job.values})
            summary["failed"] += 1
            summary["not_run"] -= 1
            progress.failed += 1
            finish(job)

        def retry(job: Job, w: WorkerState, message: str, log_tail: str = "") -> None:
            attempts[job.key] = attempts.get(job.key, 1) + 1
            if attempts[job.key] > opts.retries + 1:
                fail(
                    job,
                    w,
                    f"row {job.row}: gave up after {opts.retries + 1} attempts: {message}"
                    + (f"\nthe end of that ComfyUI's log:\n{log_tail}" if log_tail else ""),
                )
            else:
                stream.write(f"row {job.row}: retrying ({message.splitlines()[0]})\n")
                pending.appendleft(job)

        while pending or any(kind == "run" for _, kind, _ in calls.values()):
            for w in workers:
                while w.state == "ready" and w.in_flight < IN_FLIGHT and pending:
                    job = pending.popleft()
                    for image in job.images:
                        if image.sha256 not in image_refs:
                            image_refs[image.sha256] = ray.put(image.path.read_bytes())
                    if jobs_began is None:
                        jobs_began = progress.started = time.monotonic()
                    calls[w.handle.run.remote(_job_payload(job, image_refs))] = (w, "run", job)
                    w.in_flight += 1
            if not calls:
                raise BatchError("no worker left: " + "; ".join(f"{w.name}: {w.error}" for w in workers))
            ready, _ = ray.wait(list(calls), num_returns=1, timeout=0.5)
            for ref in ready:
                w, kind, job = calls.pop(ref)
                if kind == "run":
                    w.in_flight -= 1
                try:
                    result = ray.get(ref)
                except RayActorError as e:
                    result = {"status": "actor_lost", "error": str(e).splitlines()[0]}
                except RayError as e:  # an exception inside the worker's code: say so, and treat it as a lost job
                    result = {"status": "lost" if kind == "run" else "broken", "error": str(e)[-2000:]}
                if kind == "start":
                    _worker_up(w, result, stream)
                    continue
                status = result["status"]
                if status == "done":
                    _write_result(
                        store,
                        job,
                        result,
                        workflow_file=opts.workflow,
                        wf_hash=wf_hash,
                        attempt=attempts.get(job.key, 1),
                    )
                    w.done += 1
                    w.images += len(result["images"])
                    w.busy_s += result["timings"].get("execute_s") or 0
                    summary["done"] += 1
                    summary["not_run"] -= 1
                    progress.done += 1
                    progress.images += len(result["images"])
                    finish(job)
                elif status in ("invalid", "error"):
                    w.failed += 1
                    w.busy_s += (result.get("timings") or {}).get("execute_s") or 0
                    fail(job, w, f"row {job.row}: {result['error']}")
                elif status == "lost":
                    w.lost += 1
                    retry(job, w, result["error"], result.get("log_tail", ""))
                elif status == "actor_lost":
                    w.lost += 1
                    if w.state == "ready":  # the first of its in-flight calls to fail: start it again once Ray
                        w.state = "starting"  # has restarted its process (or learn that it is gone for good)
                        calls[w.handle.start.remote(class_types)] = (w, "start", None)
                    retry(job, w, f"worker {w.name}'s process died ({result['error']})")
                else:  # broken: its server cannot start any more
                    w.state, w.error = "dead", result["error"]
                    stream.write(f"worker {w.name} stopped: {result['error']}\n")
                    pending.appendleft(job)
            progress.update()
    except KeyboardInterrupt:
        summary["interrupted"] = True
        stream.write("\ninterrupted: finished jobs are kept; run the same command again to do the rest\n")
    except BatchError as e:
        summary["error"] = str(e)
        stream.write(f"\nstopped: {e}\n")
    finally:
        summary["jobs_s"] = time.monotonic() - jobs_began if jobs_began else 0.0
        progress.close()
        summary["workers"] = _stop_workers(workers, ray)
        if started_ray:
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous_term)


def _worker_up(w: WorkerState, result: dict, stream: TextIO) -> None:
    """A worker answered its start call (the first, or the one after Ray restarted its process)."""
    if result.get("status") in ("actor_lost", "broken"):
        w.state, w.error = "dead", result["error"]
        stream.write(f"worker {w.name} could not start: {w.error}\n")
        return
    if result.get("missing"):
        raise BatchError(
            f"the workflow uses node types this ComfyUI does not have: {', '.join(result['missing'])} "
            f"(is the pack in its custom_nodes folder? see {result['log']})"
        )
    w.info, w.state = result, "ready"
    w.actor_pids.add(result["actor_pid"])


def _write_result(store: OutputStore, job: Job, result: dict, workflow_file: Path, wf_hash: str, attempt: int) -> None:
    worker = {k: result["worker"][k] for k in ("name", "host", "ip", "device", "comfy_pid")}
    common = {
        "row": job.row,
        "values": job.values,
        "inputs": job.inputs,
        "key": job.key,
        "workflow": str(workflow_file),
        "workflow_sha256": wf_hash,
        "worker": worker,
        "attempt": attempt,
        "prompt_id": result["prompt_id"],
        "timings": {k: round(v, 4) for k, v in result["timings"].items() if v is not None},
        "finished_at": _utc(),
    }
    images = [
        (
            image["ext"],
            image["data"],
            {**common, "image": {"index": i, "node": image["node"], "comfy_filename": image["filename"]}},
        )
        for i, image in enumerate(result["images"])
    ]
    store.write_job(job.name, images, {"key": job.key, "row": job.row, "worker": worker["name"], "attempt": attempt})


def _stop_workers(workers: list[WorkerState], ray) -> list[dict]:
    """Stop every server (a control call: it answers while jobs run), then end the actors. Per-worker stats."""
    stops = {w.handle.stop.remote(): w for w in workers if w.state != "dead"}
    if stops:
        stopped, _ = ray.wait(list(stops), num_returns=len(stops), timeout=60)
        for ref in stopped:
            try:
                stops[ref].info = ray.get(ref)
            except ray.exceptions.RayError:
                pass  # it died while stopping: its last known state stays
    for w in workers:
        ray.kill(w.handle, no_restart=True)
    return [
        {
            "name": w.name,
            "host": w.info.get("host"),
            "device": w.info.get("device"),
            "jobs": w.done,
            "failed": w.failed,
            "lost": w.lost,
            "server_starts": w.info.get("server_starts"),
            "actor_restarts": max(0, len(w.actor_pids) - 1),
            "busy_s": round(w.busy_s, 2),
            "images": w.images,
            "error": w.error,
        }
        for w in workers
    ]


def print_summary(summary: dict, stream: TextIO) -> None:
    """The per-worker table, the totals, and every failed row with its message."""
    rows = [("worker", "host", "device", "jobs", "failed", "lost", "busy")]
    rows += [
        (
            w["name"],
            w["host"] or "-",
            w["device"] or "-",
            str(w["jobs"]),
            str(w["failed"]),
            str(w["lost"]),
            f"{w['busy_s']:.1f} s",
        )
        for w in summary["workers"]
    ]
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            stream.write(
                "  ".join(c.ljust(widths[i]) if i < 3 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip() + "\n"
            )
    rate = summary["done"] / summary["jobs_s"] * 60 if summary.get("jobs_s") else None
    stream.write(
        f"done {summary['done']}, failed {summary['failed']}, skipped (done before) {summary['skipped']}, "
        f"not run {summary['not_run']}"
        + (f"; {rate:.1f} jobs/min" if rate else "")
        + f"; {summary.get('wall_s', 0):.1f} s in all"
        + (" (interrupted)" if summary["interrupted"] else "")
        + "\n"
    )
    for f in summary["failures"]:
        stream.write(f"  failed: {f['error']}\n")
