"""tools/make_tiny_model.py: the released layout, both weight formats, byte-identical per seed."""

from __future__ import annotations

import json

import torch

from blip_diffusion_nodes.tools.make_tiny_model import make_model, weights_digest


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = make_model(tmp_path / "a", size="micro", fmt="bin")
    b = make_model(tmp_path / "b", size="micro", fmt="bin")
    c = make_model(tmp_path / "c", size="micro", fmt="bin", seed=1)
    assert weights_digest(a) == weights_digest(b) != weights_digest(c)


def test_released_layout(tmp_path):
    folder = make_model(tmp_path / "m", size="micro")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "BlipDiffusionPipeline" and index["ctx_begin_pos"] == 2
    assert index["qformer"] == ["blip_diffusion", "Blip2QFormerModel"]
    for part in (
        "qformer/config.json",
        "qformer/model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "image_processor/preprocessor_config.json",
    ):
        assert (folder / part).is_file(), part
    bin_folder = make_model(tmp_path / "b", size="micro", fmt="bin")
    state = torch.load(bin_folder / "qformer" / "pytorch_model.bin", weights_only=True)
    assert state["embeddings.position_ids"].dtype == torch.int64  # as in the released checkpoint
