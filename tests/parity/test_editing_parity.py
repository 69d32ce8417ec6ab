"""blip_core.editing against what the original LAVIS editing code computed (tests/fixtures/editing_lavis.npz).

The fixture is written by tools/reference/lavis_editing.py (its docstring has the commands), which
runs LAVIS's own ptp_utils / blip_diffusion code in the reference venv. Level 1 here: token
alignment, blend-word positions, replace schedules, AttentionRefine and LocalBlend; integers
exactly, floats within 1e-6. The Level 2 part of the fixture (two real LAVIS edit runs on the
`edit` model) is for the ComfyUI-server parity tests of the editing nodes; here it is only
checked for being complete and self-consistent.

Layout of the fixture (meta JSON in `meta`):
- l1/pair/<name>/{source_ids, target_ids, mapper, alphas, blend_alpha_layers, source_word_ids}
- l1/align/<i>/{source, target, aligned}: LAVIS's global alignment on seeded token sequences
- l1/word/<i>/{prompt_ids, word_ids, lavis_positions}
- l1/schedule/<steps>/<fraction>/{cross_alpha [steps+1, 77], self_bounds [2]}
- l1/refine/call<k>/<layer>/{probs [4*heads, q, k], target_out}: the controller over a 4-step PNDM run
- l1/refine_pair/<name>/{probs, target_out}: one refined cross-attention call per prompt pair
- l1/blend/x, l1/blend/<pair>/{maps/<j>, normalised_map, t<i>/mask, t0/target_out}
- l2/subject_embeds [1,16,768]; l2/gen/{noise, final_latent, steps_z, masks};
  l2/edit/{photo, z0, inversion_steps_z, inverted_z, final_latent, steps_z, masks}; meta["level2"]["arrays"]
  says what each holds
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blip_diffusion_nodes.blip_core.editing import (
    align_tokens,
    blend_latents,
    blend_map,
    blend_mask,
    edit_attention,
    edit_prompts,
    edits_layer,
    is_blend_layer,
    refinement_mapper,
    replace_schedule,
    replaces_self_layer,
    word_positions,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "editing_lavis.npz"
ATOL = 1e-6
LATENT = (64, 64)  # 512x512


class Fixture:
    def __init__(self, path: Path):
        self.arrays = np.load(path)
        self.meta = json.loads(self.arrays["meta"].tobytes())

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def ids(self, key: str) -> list[int]:
        return self.arrays[key].tolist()

    def tensor(self, key: str) -> torch.Tensor:
        return torch.from_numpy(self.arrays[key].astype(np.float32))


FX = Fixture(FIXTURE)
META = FX.meta


@pytest.fixture
def fx() -> Fixture:
    return FX


PAIRS = [p["name"] for p in META["level1"]["pairs"]]
PAIR = {p["name"]: p for p in META["level1"]["pairs"]}


# --- prompts and token alignment -------------------------------------------------------------------


@pytest.mark.parametrize("name", PAIRS)
def test_edit_prompts_as_lavis_builds_them(name):
    p = PAIR[name]
    assert edit_prompts(p["source_subject"], p["target_subject"], p["prompt"], "lavis") == (
        p["source_prompt"],
        p["target_prompt"],
    )
    source, target = edit_prompts(p["source_subject"], p["target_subject"], p["prompt"], "none")
    assert source == p["source_prompt"] and "sks" not in target.split()


@pytest.mark.parametrize("name", PAIRS)
def test_lavis_mapper_exact(fx, name):
    mapper, alphas = refinement_mapper(
        fx.ids(f"l1/pair/{name}/source_ids"), fx.ids(f"l1/pair/{name}/target_ids"), "lavis"
    )
    assert mapper.dtype == torch.int64 and mapper.tolist() == fx.ids(f"l1/pair/{name}/mapper")
    assert torch.equal(alphas, torch.from_numpy(fx[f"l1/pair/{name}/alphas"]))


@pytest.mark.parametrize("i", range(META["level1"]["align_cases"]))
def test_alignment_ties_broken_as_lavis(fx, i):
    assert align_tokens(fx.ids(f"l1/align/{i}/source"), fx.ids(f"l1/align/{i}/target")) == fx.ids(
        f"l1/align/{i}/aligned"
    )


SKS = 48136  # CLIP's id of "sks"


def _model_keys(target_ids: list[int]) -> list[int | None]:
    """The target row's keys as the model sees them: the 16 subject vectors (None) at position 2."""
    return target_ids[:2] + [None] * 16 + target_ids[2:]


@pytest.mark.parametrize("name", PAIRS)
def test_none_layout_aligns_the_models_keys(fx, name):
    source, lavis_text = fx.ids(f"l1/pair/{name}/source_ids"), fx.ids(f"l1/pair/{name}/target_ids")
    text = [t for t in lavis_text if t != SKS]
    mapper, alphas = refinement_mapper(source, text, "none")
    keys = _model_keys(text)
    matched = [p for p in range(len(keys)) if alphas[p] == 1]
    assert all(source[mapper[p]] == keys[p] for p in matched)  # every borrowed key is the same token
    assert alphas[2:18].eq(0).all() and mapper[2:18].eq(-1).all()  # the subject vectors keep their own
    assert len(matched) == int(fx[f"l1/pair/{name}/alphas"][: len(lavis_text)].sum())  # as many as the original
    assert mapper[len(keys) :].tolist() == list(range(len(keys), 77))


def test_lavis_layout_is_shifted_by_16(fx):
    """The original's quirk, kept by `placeholder: lavis`: its mapper, computed on the text, is applied to
    keys that hold 16 more entries, so after the subject vectors it borrows for the wrong tokens."""
    source, target = fx.ids("l1/pair/cat_dog/source_ids"), fx.ids("l1/pair/cat_dog/target_ids")
    mapper, alphas = refinement_mapper(source, target, "lavis")
    keys = _model_keys(target)  # [BOS, a, vectors x16, sks x16, dog, sitting, on, a, sofa, EOS]
    borrowed = [p for p in range(len(keys)) if alphas[p] == 1 and mapper[p] < len(source)]
    assert borrowed == [0, 1, 19, 20, 21, 22, 23]
    assert [p for p in borrowed if source[mapper[p]] == keys[p]] == [0, 1]  # "sitting on a sofa" lands on sks


def test_mapper_rejects_too_long_prompts():
    with pytest.raises(ValueError, match="at most 77"):
        refinement_mapper([1, 2], list(range(78)), "lavis")
    with pytest.raises(ValueError, match="at most 77"):
        refinement_mapper([1, 2], list(range(62)), "none")
    with pytest.raises(ValueError, match="placeholder"):
        refinement_mapper([1, 2], [1, 2], "sks")


# --- blend word ---------------------------------------------------------------------------------

# Words the original does not find (it compares space-separated words as strings) and the pack does.
FIXED = {"teddy bear": [2, 3], "dog,": [2, 6], "Dog": [2]}


@pytest.mark.parametrize("i", range(len(META["level1"]["words"])))
def test_word_positions(fx, i):
    word = META["level1"]["words"][i]
    prompt = word["prompt"]
    ours = word_positions(fx.ids(f"l1/word/{i}/prompt_ids"), fx.ids(f"l1/word/{i}/word_ids"))
    lavis = fx.ids(f"l1/word/{i}/lavis_positions")
    if word["word"] == "teddy bear":
        assert lavis == [] and ours == FIXED["teddy bear"]
    elif "dog," in prompt.split():
        assert lavis == [2] and ours == FIXED["dog,"]
    elif "Dog" in prompt.split():
        assert lavis == [] and ours == FIXED["Dog"]
    else:
        assert ours == lavis and ours


@pytest.mark.parametrize("name", PAIRS)
def test_blend_weights_only_the_source_word(fx, name):
    """LAVIS's LocalBlend zips its one word with the two prompts: only the source row gets weights."""
    layers = fx[f"l1/pair/{name}/blend_alpha_layers"]
    assert not layers[1].any()
    ours = word_positions(fx.ids(f"l1/pair/{name}/source_ids"), fx.ids(f"l1/pair/{name}/source_word_ids"))
    if PAIR[name]["source_subject"] == "teddy bear":
        assert not layers[0].any() and ours == FIXED["teddy bear"]  # the original blends nothing of the edit in
    else:
        assert np.flatnonzero(layers[0]).tolist() == ours


# --- schedules ----------------------------------------------------------------------------------

SCHEDULES = [(s, f) for s in META["level1"]["schedules"]["steps"] for f in META["level1"]["schedules"]["fractions"]]


@pytest.mark.parametrize("steps,fraction", SCHEDULES)
def test_replace_schedule(fx, steps, fraction):
    schedule = replace_schedule(steps, fraction, fraction)
    cross = fx[f"l1/schedule/{steps}/{fraction}/cross_alpha"]  # [UNet call, key]
    expected = np.array([[1.0 if schedule.refines_cross(call) else 0.0] * 77 for call in range(steps + 1)])
    assert np.array_equal(cross, expected)
    assert fx.ids(f"l1/schedule/{steps}/{fraction}/self_bounds") == [0, schedule.self_calls]
    assert [schedule.replaces_self(c) for c in range(steps + 1)] == [c < schedule.self_calls for c in range(steps + 1)]


def test_schedule_rejects_bad_values():
    for bad in ((0, 0.8, 0.4), (10, 1.5, 0.4), (10, 0.8, -0.1)):
        with pytest.raises(ValueError):
            replace_schedule(*bad)


def test_layer_rules_at_512_are_lavis_limits():
    for side in (64, 32, 16, 8):  # SD-1.5's attention resolutions at 512x512
        tokens = side * side
        assert replaces_self_layer(tokens, LATENT) == (tokens <= 16**2)
        assert is_blend_layer(tokens, LATENT) == (side == 16)
    assert replaces_self_layer(24 * 16, (96, 64)) and not replaces_self_layer(48 * 32, (96, 64))
    with pytest.raises(ValueError, match="multiple of 4"):
        is_blend_layer(256, (66, 64))


# --- AttentionRefine ----------------------------------------------------------------------------


def _rows(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cond source and cond target rows of a [4*heads, q, k] batch (uncond src, uncond tgt, cond src, cond tgt)."""
    heads = probs.shape[0] // 4
    return probs[2 * heads : 3 * heads], probs[3 * heads :]


def test_refine_over_a_run(fx):
    meta = META["level1"]["refine"]
    source_ids, target_ids = fx.ids("l1/pair/cat_dog/source_ids"), fx.ids("l1/pair/cat_dog/target_ids")
    mapper, alphas = refinement_mapper(source_ids, target_ids, "lavis")
    schedule = replace_schedule(meta["steps"], meta["cross_replace_steps"], meta["self_replace_steps"])
    edited = []
    for call in range(meta["calls"]):
        for layer in meta["layers"]:
            key = f"l1/refine/call{call}/{layer['name']}"
            source, target = _rows(fx.tensor(f"{key}/probs"))
            out = edit_attention(
                source,
                target,
                is_cross=layer["is_cross"],
                call=call,
                schedule=schedule,
                mapper=mapper,
                alphas=alphas,
                latent_hw=tuple(meta["latent_hw"]),
            )
            expected = fx.tensor(f"{key}/target_out")
            assert out.shape == expected.shape and (out - expected).abs().max().item() <= ATOL, key
            changed = not torch.equal(expected, target)
            assert changed == edits_layer(layer["is_cross"], call, schedule, layer["queries"], tuple(meta["latent_hw"]))
            edited.append((call, layer["name"], changed))
    # the run exercises every branch: cross refined then not, self replaced then not, the 1024-token layer never
    assert {(c, n) for c, n, e in edited if e} == {(c, "cross") for c in range(4)} | {(0, "self256")}


@pytest.mark.parametrize("name", PAIRS)
def test_refine_each_mapper(fx, name):
    mapper, alphas = refinement_mapper(
        fx.ids(f"l1/pair/{name}/source_ids"), fx.ids(f"l1/pair/{name}/target_ids"), "lavis"
    )
    source, target = _rows(fx.tensor(f"l1/refine_pair/{name}/probs"))
    out = edit_attention(
        source,
        target,
        is_cross=True,
        call=0,
        schedule=replace_schedule(10),
        mapper=mapper,
        alphas=alphas,
        latent_hw=LATENT,
    )
    assert (out - fx.tensor(f"l1/refine_pair/{name}/target_out")).abs().max().item() <= ATOL


# --- LocalBlend ---------------------------------------------------------------------------------

BLEND_CASES = [(c["pair"], t) for c in META["level1"]["blend"]["cases"] for t in range(len(c["thresholds"]))]


def _blend_inputs(fx, pair: str) -> list[torch.Tensor]:
    meta = META["level1"]["blend"]
    blend_layers = [
        i
        for i, layer in enumerate(meta["layers"])
        if is_blend_layer(layer["side"] ** 2, LATENT) and layer["place"] != "mid"
    ]
    assert blend_layers == [2, 3, 5, 6, 7]  # LAVIS's down_cross[2:4] + up_cross[:3] in its store order
    maps = []
    for j in range(len(blend_layers)):
        compact = fx.tensor(f"l1/blend/{pair}/maps/{j}")
        full = torch.zeros(*compact.shape[:2], 77)
        full[:, :, meta["columns"]] = compact
        maps.append(full)
    return maps


@pytest.mark.parametrize("pair,t", BLEND_CASES)
def test_local_blend(fx, pair, t):
    case = next(c for c in META["level1"]["blend"]["cases"] if c["pair"] == pair)
    threshold = case["thresholds"][t]
    assert threshold["margin"] > 1e-4  # no map value so close to the threshold that rounding could flip it
    maps = _blend_inputs(fx, pair)
    positions = word_positions(fx.ids(f"l1/pair/{pair}/source_ids"), fx.ids(f"l1/pair/{pair}/source_word_ids"))
    normalised = blend_map(maps, positions, LATENT)
    assert (normalised - fx.tensor(f"l1/blend/{pair}/normalised_map")).abs().max().item() <= ATOL
    mask = blend_mask(maps, positions, LATENT, threshold["threshold"])
    assert mask.dtype == torch.bool and np.array_equal(mask.numpy(), fx[f"l1/blend/{pair}/t{t}/mask"].astype(bool))
    if t == 0:  # the fixture keeps one blended latent per pair
        x = fx.tensor("l1/blend/x")
        out = blend_latents(x[0], x[1], mask)
        assert (out - fx.tensor(f"l1/blend/{pair}/t0/target_out")).abs().max().item() <= ATOL


def test_local_blend_bad_input():
    maps = [torch.rand(2, 256, 77)]
    with pytest.raises(ValueError, match="latent/4"):
        blend_map([torch.rand(2, 1024, 77)], [2], LATENT)
    with pytest.raises(ValueError, match="positions"):
        blend_map(maps, [], LATENT)
    with pytest.raises(ValueError, match="multiple of 4"):
        blend_map(maps, [2], (62, 64))
    assert blend_map([torch.rand(2, 24 * 16, 77)], [2], (96, 64)).shape == (96, 64)  # not 512x512: fine


# --- the Level 2 record -------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["gen", "edit"])
def test_level2_record_is_complete(fx, run):
    meta = META["level2"][run]
    steps = meta["steps"]
    calls = steps + 1 if run == "gen" else steps  # PNDM's first step takes two calls; one blend after each call
    assert fx[f"l2/{run}/final_latent"].shape == (2, 4, 64, 64) and fx["l2/subject_embeds"].shape == (1, 16, 768)
    masks, steps_z = fx[f"l2/{run}/masks"], fx[f"l2/{run}/steps_z"]
    assert masks.shape == (calls, 64, 64) and steps_z.shape == (calls - 1, 2, 4, 64, 64)
    assert min(meta["blend_margins"]) > 1e-4 and len(meta["blend_margins"]) == calls
    assert all(0 < m.mean() < 1 for m in masks)  # the threshold neither keeps nor drops the whole edit
    for k in range(calls - 1):  # outside the mask the target row was reset to the source row
        outside = ~masks[k].astype(bool)
        assert np.array_equal(steps_z[k, 1][:, outside], steps_z[k, 0][:, outside])
    final = fx[f"l2/{run}/final_latent"]
    outside = ~masks[-1].astype(bool)
    assert np.array_equal(final[1][:, outside], final[0][:, outside])
    source, target = meta["prompts"]
    assert edit_prompts(meta["src_subject"], meta["tgt_subject"], meta["prompt"], "lavis") == (source, target)
    if run == "edit":
        assert meta["inversion_prompt"] == f"a {meta['src_subject']} {meta['prompt']}"
        assert fx["l2/edit/photo"].shape == (512, 512, 3) and fx["l2/edit/photo"].dtype == np.uint8
        assert fx["l2/edit/inverted_z"].shape == fx["l2/edit/z0"].shape == (1, 4, 64, 64)
