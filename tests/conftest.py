"""Shared test fixtures: generated model folders and the committed reference fixtures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from make_tiny_model import make_model, weights_digest  # noqa: E402


class ReferenceFixture:
    """A .npz written by tools/reference/*: arrays by name plus a JSON `meta` entry."""

    def __init__(self, path: Path):
        self.path = path
        self.arrays = np.load(path)
        self.meta = json.loads(self.arrays["meta"].tobytes())

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]


@pytest.fixture(scope="session")
def core_fixture() -> ReferenceFixture:
    return ReferenceFixture(FIXTURES / "core_parity.npz")


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory, core_fixture) -> Path:
    """The micro model the core fixtures were made from, regenerated bit for bit."""
    path = make_model(tmp_path_factory.mktemp("models") / "micro", size="micro")
    if weights_digest(path) != core_fixture.meta["digest"]:
        pytest.fail("tests/fixtures/core_parity.npz was made from other weights than tools/make_tiny_model.py "
                    "writes now: run `make fixtures` to regenerate it with the reference")
    return path
