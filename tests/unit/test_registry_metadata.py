"""The registry's metadata ([tool.comfy] in pyproject.toml) says what blip_core.layout says, and its pictures exist."""

from __future__ import annotations

from pathlib import Path

import tomllib
from PIL import Image

from blip_diffusion_nodes.blip_core.layout import DOWNLOADS

ROOT = Path(__file__).resolve().parents[2]
COMFY = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_models_are_the_download_table():
    expected = []
    for download in DOWNLOADS:
        for file in download.files:
            entry = {"location": f"/{download.folder}/{download.name}/{file}", "model_url": download.url(file)}
            if entry not in expected:
                expected.append(entry)
    assert COMFY["Models"] == expected


def served_file(url: str) -> Path:
    """The repository file a raw.githubusercontent.com link of the project's main branch serves."""
    repository = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{repository}/main/"
    assert url.startswith(prefix), url
    return ROOT / url.removeprefix(prefix)


def test_icon_is_a_small_square_in_the_repository():
    with Image.open(served_file(COMFY["Icon"])) as icon:
        assert icon.width == icon.height <= 400


def test_banner_is_21_by_9_in_the_repository():
    with Image.open(served_file(COMFY["Banner"])) as banner:
        assert abs(banner.width / banner.height - 21 / 9) < 0.01
