"""A headless ComfyUI process and the small HTTP client that drives it (standard library only).

    process = ComfyProcess(find_comfyui(), base_directory=..., log_path=...)
    client = process.start()                  # waits until the server answers
    status, body = client.submit(prompt)      # 200, or 400 with node_errors
    entry = client.wait(body["prompt_id"], alive=process.alive)
    process.stop()

The server listens on 127.0.0.1 only, on a free port, with an in-memory database (nothing is
written into the ComfyUI folder's user/ database) and no API nodes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path


class ComfyError(Exception):
    """ComfyUI could not be started or did not answer as expected."""


class ComfyUnreachable(ComfyError):
    """The server did not answer (it exited, was killed, or hung): the job may be retried elsewhere."""


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path:
    """The ComfyUI folder (the one holding main.py).

    Order: `explicit`, else $COMFYUI_DIR, else the ComfyUI this pack is installed in
    (<ComfyUI>/custom_nodes/<pack>/batch/comfy.py).
    """
    for source, value in (("--comfyui", explicit), ("COMFYUI_DIR", os.environ.get("COMFYUI_DIR"))):
        if value:
            if not (Path(value) / "main.py").is_file():
                raise ComfyError(f"{source}: {value} is not a ComfyUI folder (no main.py in it)")
            return Path(value).resolve()
    # Both the path as imported and with symlinks resolved: packs are often linked into custom_nodes/.
    for pack in (Path(__file__).absolute().parents[1], Path(__file__).resolve().parents[1]):
        if pack.parent.name == "custom_nodes" and (pack.parent.parent / "main.py").is_file():
            return pack.parent.parent.resolve()
    raise ComfyError("no ComfyUI folder found: pass --comfyui DIR (the folder holding main.py) or set COMFYUI_DIR")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs main.py as __main__ (sys.path[0] is the cwd, the ComfyUI folder, as for `python main.py`) and exits when
# the process that started it dies: a killed Ray worker must not leave an orphan server holding a GPU.
_LAUNCHER = (
    "import os, runpy, sys, threading, time\n"
    "parent = os.getppid()\n"
    "def watch():\n"
    "    while os.getppid() == parent:\n"
    "        time.sleep(0.5)\n"
    "    os._exit(3)\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "sys.argv[0] = 'main.py'\n"
    "runpy.run_path('main.py', run_name='__main__')\n"
)


class ComfyProcess:
    """One ComfyUI server process on a free loopback port.

    `base_directory`: ComfyUI's --base-directory (models, custom_nodes, input, output, user), or None for the
    ComfyUI folder itself. `output_directory` / `temp_directory` override those two. `cpu`: pass --cpu.
    `threads`: OMP_NUM_THREADS for the server (CPU workers sharing a machine). `extra_args` go to main.py as they are.
    """

    def __init__(
        self,
        comfyui_dir: str | os.PathLike,
        *,
        log_path: str | os.PathLike,
        base_directory: str | os.PathLike | None = None,
        output_directory: str | os.PathLike | None = None,
        temp_directory: str | os.PathLike | None = None,
        python: str = sys.executable,
        cpu: bool = False,
        threads: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 300,
    ):
        self.comfyui_dir = Path(comfyui_dir)
        self.log_path = Path(log_path)
        self.python, self.startup_timeout = python, startup_timeout
        args = [
            "--listen",
            "127.0.0.1",
            "--database-url",
            "sqlite:///:memory:",
            "--disable-auto-launch",
            "--disable-api-nodes",
        ]
        for flag, value in (
            ("--base-directory", base_directory),
            ("--output-directory", output_directory),
            ("--temp-directory", temp_directory),
        ):
            if value is not None:
                args += [flag, str(value)]
        self.args = args + (["--cpu"] if cpu else []) + list(extra_args)
        self.env = dict(os.environ, DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.proc: subprocess.Popen | None = None
        self.client: ComfyClient | None = None

    def start(self) -> ComfyClient:
        """Start the server and wait until it answers; raises ComfyError with the log's tail if it does not."""
        if not (self.comfyui_dir / "main.py").is_file():
            raise ComfyError(f"{self.comfyui_dir} is not a ComfyUI folder (no main.py in it)")
        for attempt in range(3):
            try:
                return self._start_once()
            except ComfyError as e:
                # The free port was taken by someone else between our check and ComfyUI's bind: take another.
                if "address already in use" not in str(e).lower() or attempt == 2:
                    raise

    def _start_once(self) -> ComfyClient:
        self.stop()
        port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== starting ComfyUI on 127.0.0.1:{port} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [self.python, "-c", _LAUNCHER, *self.args, "--port", str(port)],
                cwd=self.comfyui_dir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        client = ComfyClient(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise ComfyError(f"ComfyUI exited during startup (code {code}):\n{self.log_tail()}")
            try:
                if client.request("GET", "/system_stats", timeout=5)[0] == 200:
                    self.client = client
                    return client
            except ComfyUnreachable:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the server's process group, SIGKILL after `timeout` s."""
        proc, self.proc, self.client = self.proc, None, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> ComfyClient:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ComfyClient:
    """ComfyUI's HTTP API: /prompt, /history, /upload/image, /view, /object_info."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = str(uuid.uuid4())

    def request(
        self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None, timeout: float = 60
    ) -> tuple[int, bytes]:
        """(HTTP status, body). Raises ComfyUnreachable when the server does not answer at all."""
        if isinstance(body, dict):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
        # self.url is always http://127.0.0.1:<port> of a server a ComfyProcess started (never a user's URL)
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise ComfyUnreachable(f"{method} {path}: {getattr(e, 'reason', e)}") from e

    def get_json(self, path: str, timeout: float = 60):
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path}: HTTP {status}: {body[:300].decode(errors='replace')}")
        return json.loads(body)

    def submit(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt -> (status, json). 200 queues it ({"prompt_id"}); 400 refuses it ({"error", "node_errors"})."""
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"error": {"message": body[:300].decode(errors="replace")}}

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def forget(self, prompt_id: str) -> None:
        """Drop a finished prompt from the server's history (it keeps up to 10000 in memory otherwise)."""
        self.request("POST", "/history", {"delete": [prompt_id]})

    def wait(
        self,
        prompt_id: str,
        timeout: float,
        alive: Callable[[], bool] = lambda: True,
        poll: float = 0.05,
        max_poll: float = 0.2,
    ) -> dict:
        """The history entry once the prompt finished (success or error).

        Polls /history every `poll` s, backing off to `max_poll`: each poll takes the server's event loop
        and the GIL from the prompt it is running. Raises ComfyUnreachable when `alive()` turns false, the
        server stops answering, or `timeout` passes.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not alive():
                raise ComfyUnreachable("the ComfyUI process exited")
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if time.monotonic() > deadline:
                raise ComfyUnreachable(f"prompt {prompt_id} not finished after {timeout:g} s")
            time.sleep(poll)
            poll = min(max_poll, poll * 1.5)

    def upload_image(self, data: bytes, name: str, subfolder: str = "") -> str:
        """Upload into the input folder (overwriting); returns the value a LoadImage `image` input takes."""
        boundary = uuid.uuid4().hex
        parts = []
        for field, value in (("type", "input"), ("overwrite", "true"), ("subfolder", subfolder)):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
        parts.append(f"--{boundary}--\r\n".encode())
        status, body = self.request(
            "POST", "/upload/image", b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        if status != 200:
            raise ComfyError(f"upload of {name}: HTTP {status}: {body[:300].decode(errors='replace')}")
        info = json.loads(body)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    def view(self, file_info: dict) -> bytes:
        """The bytes of an output file named in a history entry ({"filename", "subfolder", "type"})."""
        query = urllib.parse.urlencode({k: file_info.get(k, "") for k in ("filename", "subfolder", "type")})
        status, body = self.request("GET", "/view?" + query)
        if status != 200:
            raise ComfyError(f"GET /view {file_info}: HTTP {status}")
        return body


def output_images(entry: dict) -> list[tuple[str, dict]]:
    """(node id, file info) of every image a finished prompt saved (type "output"; previews are left out),
    in node-id order then the node's own order: the same graph always lists its images the same way."""

    def order(node_id: str):
        return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)

    return [
        (node_id, info)
        for node_id in sorted(entry.get("outputs", {}), key=order)
        for info in entry["outputs"][node_id].get("images", [])
        if info.get("type") == "output"
    ]


def execution_seconds(entry: dict) -> float | None:
    """Time the server spent executing the prompt (execution_start to its end), from the history's messages."""
    stamps = {kind: data.get("timestamp") for kind, data in entry.get("status", {}).get("messages", [])}
    start = stamps.get("execution_start")
    end = stamps.get("execution_success") or stamps.get("execution_error") or stamps.get("execution_interrupted")
    return (end - start) / 1000 if start is not None and end is not None else None


def describe_execution_error(entry: dict) -> str:
    """One line for a prompt that failed while running: which node, which exception, its message."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            where = f"node {data.get('node_id')} ({data.get('node_type')})"
            if kind == "execution_interrupted":
                return f"{where}: interrupted"
            return f"{where} raised {data.get('exception_type')}: {str(data.get('exception_message', '')).strip()}"
    return "ComfyUI reported an error without an execution_error message"


def describe_rejection(body: dict, prompt: dict, labels: dict[tuple[str, str], str] | None = None) -> str:
    """What ComfyUI refused (HTTP 400), one part per node and message: the node, its inputs (and the manifest
    columns that set them, from `labels`: (node id, input) -> column), the message."""
    problems: dict[tuple[str, str], list[str]] = {}  # (node, message) -> inputs: validate_inputs reports per input
    for node_id, info in (body.get("node_errors") or {}).items():
        class_type = info.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        for err in info.get("errors", []):
            input_name = (err.get("extra_info") or {}).get("input_name")
            detail = str(err.get("details") or "").strip()
            if input_name:  # ComfyUI writes "<input> - <message>": the input is named once, below
                detail = detail.removeprefix(f"{input_name} - ")
            message = str(err.get("message") or err.get("type") or "invalid").strip()
            message += f": {detail}" if detail and detail not in message else ""
            inputs = problems.setdefault((f"node {node_id} ({class_type})", message), [])
            if input_name:
                column = (labels or {}).get((node_id, input_name))
                inputs.append(f"'{input_name}'" + (f" (column '{column}')" if column else ""))
    if not problems:
        error = body.get("error") or {}
        return str(error.get("message") or error.get("type") or body)[:500] if isinstance(error, dict) else str(error)
    return "; ".join(
        f"{node}{' input ' + ', '.join(inputs) if inputs else ''}: {message}"
        for (node, message), inputs in problems.items()
    )
