"""blip_core.editing's sampling-run side: EditSpec from token ids, and EditRun on a layer's q, k, v (what the
ComfyUI attention patch hands it) against the probability-level functions the Level 1 parity tests check."""

from __future__ import annotations

import pytest
import torch

from blip_diffusion_nodes.blip_core.editing import (
    EditRun,
    EditSettings,
    attention_probs,
    blend_latents,
    blend_mask,
    edit_attention,
    edit_spec,
    refinement_mapper,
    replace_schedule,
    weighted_values,
)

BOS, EOS, SKS = 49406, 49407, 48136
A, CAT, DOG, ON, THE, GRASS = 320, 2368, 1929, 525, 518, 3914
SOURCE = [BOS, A, CAT, ON, THE, GRASS, EOS]
LAVIS_TARGET = [BOS, A, *[SKS] * 16, DOG, ON, THE, GRASS, EOS]
HEADS, D = 2, 4
LATENT = (8, 8)  # blend layers: (8/4)^2 = 4 tokens


def spec(placeholder="lavis", source=SOURCE, target=LAVIS_TARGET, word=(CAT,)):
    return edit_spec(source, target, list(word), placeholder, "a cat on the grass", "…", "cat")


def run(call=0, **settings) -> EditRun:
    r = EditRun(spec(), EditSettings(**settings), steps=4, latent_hw=LATENT)
    r.call = call
    return r


def qkv(tokens: int, keys: int, batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, n, HEADS * D, generator=g) for n in (tokens, keys, keys))


def fused(q, k, v):
    """Plain attention over a batch, as ComfyUI's optimized attention computes it."""
    return torch.stack([weighted_values(attention_probs(q[i], k[i], HEADS), v[i]) for i in range(q.shape[0])])


def test_spec_is_the_mapper_and_the_blend_word():
    s = spec()
    mapper, alphas = refinement_mapper(SOURCE, LAVIS_TARGET, "lavis")
    assert torch.equal(s.mapper, mapper) and torch.equal(s.alphas, alphas)
    assert s.blend_positions == (2,)
    assert s.key == spec().key and s.key != spec("none", target=[BOS, A, DOG, ON, THE, GRASS, EOS]).key


def test_spec_errors_name_the_input():
    with pytest.raises(ValueError, match="source_subject: 'cat' is not a word of the source prompt"):
        spec(word=(DOG,))
    with pytest.raises(ValueError, match="source_subject"):
        spec(word=())
    with pytest.raises(ValueError, match="prompt: the target text .* takes 78 tokens"):
        spec(target=[BOS, *[A] * 76, EOS])
    with pytest.raises(ValueError, match="prompt: the source prompt .* takes 78 tokens"):
        spec(source=[BOS, CAT, *[A] * 75, EOS])
    long_text = [BOS, A, *[A] * 70, EOS]  # none: the model holds 59 text tokens; the mapper follows it
    assert spec("none", target=long_text).mapper.shape == (77,)


@pytest.mark.parametrize("call", [0, 3, 4])
@pytest.mark.parametrize("conditional", [[True, False], [False, True], [True]])
def test_cross_attention_edits_only_the_conditional_target_row(call, conditional):
    r = run(call)
    q, k, v = qkv(64, 77, batch=2 * len(conditional))
    out = fused(q, k, v)
    edited = r.attend("layer", True, q, k, v, HEADS, conditional, out.clone(), fused)
    src = 2 * conditional.index(True)
    expected = out.clone()
    source, target = attention_probs(q[src], k[src], HEADS), attention_probs(q[src + 1], k[src + 1], HEADS)
    probs = edit_attention(
        source,
        target,
        is_cross=True,
        call=call,
        schedule=r.schedule,
        mapper=r.spec.mapper,
        alphas=r.spec.alphas,
        latent_hw=LATENT,
    )
    expected[src + 1] = weighted_values(probs, v[src + 1])
    assert torch.allclose(edited, expected, atol=1e-6)
    assert torch.equal(edited[: src + 1], out[: src + 1]) and torch.equal(edited[src + 2 :], out[src + 2 :])
    assert r.schedule.refines_cross(call) == (not torch.equal(edited, out))  # 4 steps: calls 0-3 refine (int(0.8*5))


def test_self_attention_replace_in_coarse_layers_only():
    r = run(0)
    for tokens, replaced in ((1, True), (4, True), (16, False), (64, False)):  # latent/4: 2x2 = 4 tokens
        q, k, v = qkv(tokens, tokens)
        out = fused(q, k, v)
        edited = r.attend("layer", False, q, k, v, HEADS, [True, False], out.clone(), fused)
        if replaced:
            expected = weighted_values(attention_probs(q[0], k[0], HEADS), v[1])
            assert torch.allclose(edited[1], expected, atol=1e-6) and torch.equal(edited[0], out[0])
        else:
            assert torch.equal(edited, out)
    late = run(2)  # self replace: int(0.4 * 4) = 1 call
    q, k, v = qkv(4, 4)
    out = fused(q, k, v)
    assert torch.equal(late.attend("layer", False, q, k, v, HEADS, [True, False], out.clone(), fused), out)


def test_blend_maps_are_sums_of_the_source_rows_at_latent_quarter_layers():
    r = run(0)
    calls = []
    for call in range(3):
        r.call = call
        for layer, tokens in (("coarse", 4), ("fine", 16), ("coarse2", 4)):
            q, k, v = qkv(tokens, 77, seed=10 * call + tokens)
            r.attend(layer, True, q, k, v, HEADS, [False, True], fused(q, k, v), fused)
            if tokens == 4:
                calls.append((layer, attention_probs(q[2], k[2], HEADS)))  # the conditional chunk's source row
    assert sorted(r.maps) == ["coarse", "coarse2"]
    for layer in r.maps:
        assert torch.allclose(r.maps[layer], sum(p for name, p in calls if name == layer), atol=1e-6)
    x = torch.randn(2, 4, *LATENT)
    mask = blend_mask(list(r.maps.values()), [2], LATENT, 0.3)
    assert torch.equal(r.blend(x), torch.stack([x[0], blend_latents(x[0], x[1], mask)]))


def test_a_longer_negative_repeats_the_tokens_and_changes_nothing():
    """ComfyUI batches a 77-token conditioning with a 154-token negative by repeating its tokens."""
    r77, r154 = run(0), run(0)
    q, k, v = qkv(4, 77)
    k2, v2 = torch.cat([k, k], 1), torch.cat([v, v], 1)
    a = r77.attend("l", True, q, k, v, HEADS, [True, False], fused(q, k, v), fused)
    b = r154.attend("l", True, q, k2, v2, HEADS, [True, False], fused(q, k2, v2), fused)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(r77.maps["l"], r154.maps["l"], atol=1e-6)


def test_blend_needs_a_multiple_of_32_and_a_map():
    with pytest.raises(ValueError, match="local_blend: LocalBlend needs an image whose width and height are multiples"):
        EditRun(spec(), EditSettings(), steps=4, latent_hw=(9, 8))
    EditRun(spec(), EditSettings(local_blend=False), steps=4, latent_hw=(9, 11))  # no blend: any size
    with pytest.raises(ValueError, match="no cross-attention layer at a quarter"):
        run().blend(torch.zeros(2, 4, *LATENT))


def test_claiming_the_blend():
    r = run()
    assert r.blends_x0()
    assert r.claim_exact_blend() == r.blend and not r.blends_x0()
    off = run(local_blend=False)
    assert off.claim_exact_blend() is None and not off.blends_x0()


def test_schedule_counts_model_calls():
    assert run().schedule == replace_schedule(4, 0.8, 0.4)
