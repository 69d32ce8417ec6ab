"""`make gpu-check` must work the first time a GPU is there: its dry run (every step on the CPU at tiny sizes) here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.reference
def test_gpu_check_dry_run_writes_its_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = out.read_text()
    assert table.startswith("GPU check (DRY RUN")
    for row in (
        "| (a) end-to-end parity",
        "| model load",
        "| (b) subject encoding, batch 1 (s) |",
        "| (b) conditioning",
        "| (b) one image 64x64, 2 steps, CFG 7.5 (s) |",
        "| (c) the same with the ControlNet (s) |",
        "| it/s, no ControlNet",
        "| it/s, with the ControlNet",
        "| subject encoding + conditioning, % of one image |",
        "| peak GPU memory, reserved (GB) | - | - | - |",
    ):
        assert row in table, (row, table)
    delta = float(re.search(r"\| \(a\) end-to-end parity[^|]*\| ([\d.]+) / 255", table).group(1))
    assert delta <= 2.0  # the bar of tests/comfy/test_zero_shot.py's parity test
