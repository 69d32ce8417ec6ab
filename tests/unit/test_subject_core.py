"""Subject blends, weighted view averages, subject files and the LAVIS cache import (core, no ComfyUI)."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blip_diffusion_nodes.blip_core.subject import Subject
from blip_diffusion_nodes.blip_core.subject_blend import average_views, blend, parse_weights
from blip_diffusion_nodes.blip_core.subject_file import FORMAT, VERSION, load_subject, save_subject, subject_from_lavis


def subject(seed: int, views: int = 1, category: str = "dog", **metadata) -> Subject:
    g = torch.Generator().manual_seed(seed)
    return Subject(torch.randn(views, 16, 768, generator=g), category, dict(metadata))


def test_parse_weights_scales_to_one_and_rejects_what_it_cannot_use():
    assert parse_weights("  ", 3) is None
    assert torch.equal(parse_weights("2, 1, 1", 3), torch.tensor([0.5, 0.25, 0.25]))
    for text, count, message in (
        ("1, 2", 3, "expected 3 weights"),
        ("1, x", 2, "comma-separated numbers"),
        ("1, -1", 2, "zero or positive"),
        ("0, 0", 2, "positive sum"),
        ("nan, 1", 2, "zero or positive"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_weights(text, count)


def test_weights_one_zero_select_the_first_view_exactly():
    views = subject(0, views=2).embeds
    assert torch.equal(average_views(views, parse_weights("1, 0", 2)), views[:1])
    assert torch.equal(average_views(views), views.mean(dim=0, keepdim=True))


def test_blend_endpoints_are_exact_and_the_middle_interpolates():
    a, b = subject(1, category="dog", encoder="m"), subject(2, category="cat", encoder="m")
    assert torch.equal(blend(a, b, 0.0).embeds, a.embeds)
    assert torch.equal(blend(a, b, 1.0).embeds, b.embeds)
    mid = blend(a, b, 0.25)
    torch.testing.assert_close(mid.embeds, 0.75 * a.embeds + 0.25 * b.embeds)
    assert mid.category == "dog" and blend(a, b, 0.25, " dogcat ").category == "dogcat"
    assert mid.metadata == {"encoder": "m", "blend": "0.75 x dog + 0.25 x cat"}
    assert blend(mid, a, 0.5).metadata["blend"] == "0.5 x (0.75 x dog + 0.25 x cat) + 0.5 x dog"


def test_blend_views_pair_up_or_broadcast_a_single_view():
    one, two, three = subject(1), subject(2, views=2), subject(3, views=3)
    mixed = blend(one, two, 0.5)
    assert mixed.embeds.shape == (2, 16, 768)
    torch.testing.assert_close(mixed.embeds[1], 0.5 * one.embeds[0] + 0.5 * two.embeds[1])
    with pytest.raises(ValueError, match="2 views and subject_b 3"):
        blend(two, three, 0.5)
    narrow = Subject(torch.zeros(1, 16, 32), "dog")
    with pytest.raises(ValueError, match="different subject encoders"):
        blend(one, narrow, 0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        blend(one, one, 1.5)


def test_subject_file_round_trip_is_bit_exact(tmp_path):
    original = subject(4, views=3, category="teapot", preprocess="crop", encoder="blipdiffusion", image_sha256="ab")
    save_subject(original, tmp_path / "s.safetensors")
    loaded = load_subject(tmp_path / "s.safetensors")
    assert torch.equal(loaded.embeds, original.embeds) and loaded.embeds.dtype == torch.float32
    assert (loaded.category, loaded.metadata) == (original.category, original.metadata)
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert list(f.keys()) == ["embeds"]
        assert f.metadata() == {
            "format": FORMAT,
            "version": VERSION,
            "category": "teapot",
            "preprocess": "crop",
            "encoder": "blipdiffusion",
            "image_sha256": "ab",
        }


def test_subject_file_errors_say_what_was_expected(tmp_path):
    embeds = {"embeds": torch.zeros(1, 16, 768)}
    save_file(embeds, str(tmp_path / "v2.safetensors"), metadata={"format": FORMAT, "version": "2", "category": "x"})
    with pytest.raises(
        ValueError, match=r"v2.safetensors is a subject file of format version '2'; .* reads version '1'"
    ):
        load_subject(tmp_path / "v2.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="lora.safetensors is not a BLIP-Diffusion subject file"):
        load_subject(tmp_path / "lora.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable .safetensors file"):
        load_subject(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        save_subject(subject(0, version="3"), tmp_path / "x.safetensors")


def lavis_checkpoint(path, cache: torch.Tensor, nested: bool = True) -> None:
    """A LAVIS fine-tuning checkpoint's layout: trained parameters under "model", plus optimizer state."""
    model = {"ctx_embeddings_cache": cache, "unet.conv_in.weight": torch.randn(4, 4, 3, 3)}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "epoch": 0} if nested else model, path)


@pytest.mark.parametrize("layout", ["nested", "flat", "bare"])
def test_lavis_cache_import(tmp_path, layout):
    cache = torch.randn(1, 16, 768, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "checkpoint.pth"
    if layout == "bare":  # ctx_embeddings_cache/ctx_embeddings_cache.pt of a pretrained folder
        torch.save(cache, path)
    else:
        lavis_checkpoint(path, cache, nested=layout == "nested")
    imported = subject_from_lavis(path, "dog")
    assert torch.equal(imported.embeds, cache) and imported.category == "dog"
    assert imported.metadata["checkpoint"] == "checkpoint.pth"


def test_lavis_import_refuses_code_zeros_and_other_files(tmp_path):
    torch.save(
        {"model": {"ctx_embeddings_cache": torch.ones(1, 16, 768)}, "args": argparse.Namespace(lr=1)},
        tmp_path / "code.pth",
    )
    with pytest.raises(ValueError, match="weights_only=True rejected it"):
        subject_from_lavis(tmp_path / "code.pth", "dog")
    lavis_checkpoint(tmp_path / "base.pth", torch.zeros(1, 16, 768))
    with pytest.raises(ValueError, match="all zeros"):
        subject_from_lavis(tmp_path / "base.pth", "dog")
    torch.save({"model": {"unet.conv_in.weight": torch.ones(2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no ctx_embeddings_cache"):
        subject_from_lavis(tmp_path / "other.pth", "dog")
