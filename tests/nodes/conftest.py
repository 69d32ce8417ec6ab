"""In-process tests of the node helpers: ComfyUI's own modules imported here, no server, a second each.

Run in a pytest process of their own with ComfyUI's folder on PYTHONPATH (`make test` does):
importing ComfyUI sets process-wide state (its arguments, the model folders, sys.path).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile

import pytest

try:
    from comfy.cli_args import args
except ImportError:
    pytest.exit("tests/nodes needs ComfyUI importable: run them with PYTHONPATH=<ComfyUI folder> (make test does)", 2)

# What main.py's command line would set, before the modules that read them are imported.
args.cpu = True
args.base_directory = tempfile.mkdtemp(prefix="blipd-nodes-")
atexit.register(shutil.rmtree, args.base_directory, ignore_errors=True)
