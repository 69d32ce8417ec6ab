"""Core subject encoder: loading (both weight formats, LAVIS names), precision, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip_diffusion_nodes.blip_core.config import SubjectEncoderConfig
from blip_diffusion_nodes.blip_core.preprocess import preprocess
from blip_diffusion_nodes.blip_core.subject_encoder import SubjectEncoderModel, load_subject_encoder
from blip_diffusion_nodes.tools.make_tiny_model import make_model

IMAGES = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def encoder(micro_model):
    return load_subject_encoder(micro_model)


@pytest.fixture(scope="module")
def reference_output(encoder):
    return encoder.encode(IMAGES, ["dog", "teddy bear"])


def test_shapes_and_dtype(encoder, reference_output):
    assert reference_output.shape == (2, 16, 32) and reference_output.dtype == torch.float32
    assert encoder.encode(IMAGES[:1], "dog").shape == (1, 16, 32)


def test_released_checkpoint_has_679_tensors_and_full_size_parameter_count():
    with torch.device("meta"):
        model = SubjectEncoderModel(SubjectEncoderConfig())
    state = model.state_dict()
    assert len(state) + 1 == 679  # + embeddings.position_ids, which is recomputed rather than loaded
    assert sum(v.numel() for v in state.values()) == 493_983_744


def test_pickle_bin_loads_the_same_numbers(tmp_path, reference_output):
    folder = make_model(tmp_path / "micro_bin", size="micro", fmt="bin")
    assert (folder / "qformer" / "pytorch_model.bin").is_file()
    out = load_subject_encoder(folder).encode(IMAGES, ["dog", "teddy bear"])
    assert torch.equal(out, reference_output)


def test_qformer_folder_and_single_file(micro_model, reference_output):
    assert torch.equal(
        load_subject_encoder(micro_model / "qformer").encode(IMAGES, ["dog", "teddy bear"]), reference_output
    )
    config = SubjectEncoderConfig.from_json(micro_model / "qformer" / "config.json")
    single = load_subject_encoder(micro_model / "qformer" / "model.safetensors", config=config)
    assert torch.equal(single.encode(IMAGES, ["dog", "teddy bear"]), reference_output)


def to_lavis(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original LAVIS names, written from the mapping table of the diffusers conversion script."""
    out = {}
    blocks = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.qkv.weight": "attn.in_proj_weight",
        "self_attn.qkv.bias": "attn.in_proj_bias",
        "self_attn.projection": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for key, value in state.items():
        if key.startswith("proj_layer."):
            out[key] = value
        elif key == "query_tokens":
            out["blip.query_tokens"] = value
        elif key.startswith(("embeddings.", "encoder.")):
            out[
                "blip.Qformer.bert."
                + key.replace(".attention.attention.", ".attention.self.").replace(
                    ".crossattention.attention.", ".crossattention.self."
                )
            ] = value
        elif key == "visual_encoder.embeddings.class_embedding":
            out["blip.visual_encoder.class_embedding"] = value.reshape(-1)
        elif key == "visual_encoder.embeddings.position_embedding":
            out["blip.visual_encoder.positional_embedding"] = value[0]
        elif key == "visual_encoder.embeddings.patch_embedding.weight":
            out["blip.visual_encoder.conv1.weight"] = value
        elif key.startswith("visual_encoder.pre_layernorm."):
            out["blip.visual_encoder.ln_pre." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("visual_encoder.post_layernorm."):
            out["blip.ln_vision." + key.rsplit(".", 1)[1]] = value
        else:
            index, rest = key[len("visual_encoder.encoder.layers.") :].split(".", 1)
            old = next(k for k in blocks if rest.startswith(k))
            out[f"blip.visual_encoder.transformer.resblocks.{index}.{blocks[old]}{rest[len(old) :]}"] = value
    # what a full LAVIS BLIP-Diffusion checkpoint also holds and the subject encoder ignores
    out["blip.vision_proj.weight"] = torch.zeros(4, 4)
    out["unet.conv_in.weight"] = torch.zeros(1)
    return {"model": out}


def test_lavis_checkpoint_names(tmp_path, micro_model, reference_output):
    state = load_file(str(micro_model / "qformer" / "model.safetensors"))
    state.pop("embeddings.position_ids")
    torch.save(to_lavis(state), tmp_path / "blip_diffusion.pth")
    config = SubjectEncoderConfig.from_json(micro_model / "qformer" / "config.json")
    out = load_subject_encoder(tmp_path / "blip_diffusion.pth", config=config).encode(IMAGES, ["dog", "teddy bear"])
    assert torch.equal(out, reference_output)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_close(micro_model, reference_output, dtype):
    out = load_subject_encoder(micro_model, dtype=dtype).encode(IMAGES, ["dog", "teddy bear"])
    assert out.dtype == torch.float32  # handed back in float32 whatever the compute dtype
    cosine = torch.nn.functional.cosine_similarity(out.flatten(1), reference_output.flatten(1))
    assert cosine.min() > 0.995, cosine
    assert all(
        p.dtype == torch.float32
        for n, p in load_subject_encoder(micro_model, dtype=dtype).model.named_parameters()
        if "norm" in n.lower()
    )  # LayerNorms stay float32


def test_vision_eps_defaults_to_the_original_1e5(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"hidden_size": 1024}}))
    assert SubjectEncoderConfig.from_json(tmp_path / "config.json").vision.layer_norm_eps == 1e-5


def test_preprocess_modes_and_channels():
    rgb = torch.rand(1, 30, 60, 3)
    assert preprocess(rgb, "squash").shape == (1, 3, 224, 224)
    assert preprocess(rgb, "crop").shape == (1, 3, 224, 224)
    assert not torch.equal(preprocess(rgb, "squash"), preprocess(rgb, "crop"))
    gray = torch.rand(1, 30, 60, 1)
    assert torch.equal(preprocess(gray), preprocess(gray.expand(-1, -1, -1, 3)))
    rgba = torch.cat([rgb, torch.zeros(1, 30, 60, 1)], dim=-1)
    assert torch.equal(preprocess(rgba), preprocess(rgb))  # alpha is dropped, as in the reference


def test_mask_whitens_the_background():
    rgb = torch.rand(1, 32, 32, 3)
    white = torch.ones_like(rgb)
    assert torch.equal(preprocess(rgb, mask=torch.zeros(1, 32, 32)), preprocess(white))
    assert torch.equal(preprocess(rgb, mask=torch.ones(8, 8)), preprocess(rgb))  # resized to the image


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", ["", "   "])
def test_empty_subject(encoder, subject):
    with pytest.raises(ValueError, match="category is empty"):
        encoder.encode(IMAGES[:1], subject)


def test_zero_size_image(encoder):
    with pytest.raises(ValueError, match="non-empty image"):
        encoder.encode(torch.rand(1, 0, 10, 3), "dog")


def test_wrong_channel_count(encoder):
    with pytest.raises(ValueError, match="channels"):
        encoder.encode(torch.rand(1, 10, 10, 2), "dog")


def test_folder_without_qformer(tmp_path):
    with pytest.raises(FileNotFoundError, match="qformer/config.json"):
        load_subject_encoder(tmp_path)


def test_truncated_safetensors(tmp_path, micro_model):
    shutil.copytree(micro_model / "qformer", tmp_path / "qformer")
    weights = tmp_path / "qformer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_subject_encoder(tmp_path)


def test_truncated_bin(tmp_path):
    folder = make_model(tmp_path / "micro_bin", size="micro", fmt="bin")
    weights = folder / "qformer" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=str(weights.name)):
        load_subject_encoder(folder)


def test_checkpoint_of_another_model(tmp_path, micro_model):
    shutil.copytree(micro_model / "qformer", tmp_path / "qformer")
    text_weights = load_file(str(micro_model / "text_encoder" / "model.safetensors"))
    save_file(text_weights, str(tmp_path / "qformer" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not match the expected model: missing: .*unexpected: text_model"):
        load_subject_encoder(tmp_path)


def test_wrong_shapes_are_named(tmp_path, micro_model):
    shutil.copytree(micro_model / "qformer", tmp_path / "qformer")
    config = json.loads((tmp_path / "qformer" / "config.json").read_text())
    config["qformer_config"]["intermediate_size"] = 128
    (tmp_path / "qformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"wrong shape: encoder\.layer\.0\.intermediate"):
        load_subject_encoder(tmp_path)


def test_code_in_a_pickle_is_never_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    shutil.copytree(make_model(tmp_path / "m", size="micro", fmt="bin") / "qformer", tmp_path / "evil" / "qformer")
    torch.save({"query_tokens": Payload()}, tmp_path / "evil" / "qformer" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refused to load"):
        load_subject_encoder(tmp_path / "evil")
    assert not marker.exists()
