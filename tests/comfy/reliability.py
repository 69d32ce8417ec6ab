"""The reliability matrix (docs/reliability.md): the registry of the rows tests cover, and the helpers its
tests share. Any tests/comfy or tests/batch module registers its rows with covers() or rows();
test_reliability.py checks that the doc lists exactly the registered rows and the static checks."""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import signal
import threading
import time
from pathlib import Path

import psutil

from blip_diffusion_nodes.tests.graphs import zero_shot
from blip_diffusion_nodes.tools.comfy_server import execution_error

CAT = "blipd_example_cat.jpg"
COVERED: set[str] = set()  # matrix rows the tests cover


def rows(*ids: str) -> tuple[str, ...]:
    """Register matrix row ids covered by a test (or by the cases of a parametrized test)."""
    COVERED.update(ids)
    return ids


def covers(*ids: str):
    rows(*ids)
    return lambda test: test


# --- helpers -----------------------------------------------------------------------------------

_seeds = itertools.count(1000)  # a fresh seed per prompt: the sampler really runs, not ComfyUI's cache


def small(model: str, **kwargs) -> dict:
    """The zero-shot graph at its cheapest that still runs the UNet: 64x64, two steps (a single
    reference step is the release's no-op last step, which makes no model call)."""
    return zero_shot(model, **{"size": 64, "steps": 2, "seed": next(_seeds), "prefix": "rel", **kwargs})


def healthy(comfy, model: str) -> None:
    """The next valid prompt succeeds and saves its image."""
    entry = comfy.run_ok(small(model, prefix="rel_healthy"))
    assert comfy.image(entry, "9").shape == (64, 64, 3)


def rejected(comfy, prompt: dict, node: str, input_name: str, *expected: str) -> str:
    """HTTP 400, nothing queued: an error of node `node` for `input_name` whose text holds `expected`."""
    status, body = comfy.submit(prompt)
    assert status == 400, body
    errors = body["node_errors"]
    assert list(errors) == [node], errors
    texts = [
        f"{e['message']}: {e['details']}"
        for e in errors[node]["errors"]
        if e.get("extra_info", {}).get("input_name") == input_name
    ]
    assert any(all(x in text for x in expected) for text in texts), (expected, errors)
    return texts[0]


def failed(comfy, prompt: dict, node_type: str, *expected: str) -> str:
    """Queued, then a runtime error in /history from a `node_type` node whose message holds `expected`."""
    error = execution_error(comfy.run(prompt))
    assert error is not None, "the prompt ran without an error"
    assert error["node_type"] == node_type, error
    message = error["exception_message"]
    for text in expected:
        assert text in message, (text, message)
    return message


def all_covered_rows() -> set[str]:
    """The rows every tests/comfy and tests/batch module registers (importing each registers its rows, whatever
    was collected)."""
    for folder in ("comfy", "batch"):
        for path in sorted((Path(__file__).parents[1] / folder).glob("test_*.py")):
            importlib.import_module(f"blip_diffusion_nodes.tests.{folder}.{path.stem}")
    return set(COVERED)


@contextlib.contextmanager
def memory_guard(comfy, limit_gb: float = 3.0):
    """Hostile cases run under this: the server's resident memory may grow by at most `limit_gb` while the block
    runs. A watcher samples it every 50 ms and, past the limit, kills the server before it can take the machine
    down; the test then fails (a regression fails the test, not the machine)."""
    server = psutil.Process(comfy.pid)
    start = server.memory_info().rss
    limit = start + limit_gb * (1 << 30)
    peak, done = [start], threading.Event()

    def watch():
        while not done.is_set():
            rss = server.memory_info().rss
            peak[0] = max(peak[0], rss)
            if rss > limit:
                os.killpg(comfy.pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
    growth = (peak[0] - start) / (1 << 30)
    assert peak[0] <= limit, f"the server's memory grew by {growth:.1f} GB (limit {limit_gb} GB): it was stopped"
