"""tools/lint_safety.py (run by `make lint`): each check finds what it must, so a clean lint means something."""

from __future__ import annotations

from blip_diffusion_nodes.tools.lint_safety import (
    ROOT,
    comfy_internals,
    number_helpers,
    unchecked_numbers,
    unresolved_uses,
    unsafe_loads,
)


def test_unsafe_loads_are_found():
    assert (
        len(
            unsafe_loads(
                "import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
                "comfy.utils.load_torch_file(p)\nfrom pickle import loads\n"
                "np.load(p, allow_pickle=True)\npickle.loads(b)\n"
            )
        )
        == 6
    )
    assert (
        unsafe_loads(
            "torch.load(p, map_location='cpu', weights_only=True)\ncomfy.utils.load_torch_file(p, "
            "safe_load=True)\nnp.load(p)\n"
        )
        == []
    )


def test_file_names_that_skip_the_resolvers_are_found():
    bad = (
        "def weights(name):\n    return open(name)\n"
        'class X:\n    def define_schema(cls):\n        io.Combo.Input("model_name", options=paths.model_folders())\n'
        "    def execute(cls, model_name):\n        return weights(model_name), open(Path(root) / model_name)\n"
    )
    assert unresolved_uses(bad)[1] == [
        "X.execute -> weights:2 name: open(name)",
        "X.execute:7 model_name: Path(root) / model_name",
    ]


def test_the_pack_s_file_inputs_are_all_seen():
    """The check is not vacuous: it follows every file-naming input of the nodes to a resolver."""
    uses = [use for path in sorted((ROOT / "nodes").glob("*.py")) for use in unresolved_uses(path.read_text())[0]]
    for expected in (
        "BlipDiffusionLoader.execute",
        "BlipDiffusionSubjectEncoderLoader.execute",
        "BlipDiffusionLoadSubject.execute",
        "BlipDiffusionSaveSubject.execute",
        "BlipDiffusionControlNetLoader.execute",
        "BlipDiffusionHEDEdges.execute",
    ):
        assert any(expected in use for use in uses), (expected, uses)


def test_comfy_internals_are_found():
    assert sorted(comfy_internals("clip.cond_stage_model.clip_l.transformer\nx = model.model.diffusion_model\n")) == [
        "line 1: .clip_l",
        "line 1: .cond_stage_model",
        "line 2: .diffusion_model",
    ]
    assert comfy_internals("x = subject.embeds\n") == []


def test_number_inputs_without_a_check_are_found():
    source = (
        'def ratio_input():\n    return io.Float.Input("ratio", default=0.5)\n'
        'class A:\n    def define_schema(cls):\n        io.Float.Input("cfg")\n        ratio_input()\n'
        '        io.Int.Input("steps")\n        io.Int.Input("seed")\n'
        "    def validate_inputs(cls, cfg=None, ratio=None, steps=None):\n"
        "        return number_error(cls, cfg=cfg) or True\n"
        'class B:\n    def define_schema(cls):\n        io.Float.Input("cfg")\n'
    )
    helpers = number_helpers([source])
    assert helpers == {"ratio_input": ("ratio", "Float")}
    assert unchecked_numbers(source, helpers) == [
        "A: FLOAT input 'ratio' is not checked by number_error in validate_inputs",
        "A: INT input 'steps' is not checked by number_error in validate_inputs",
        "B: FLOAT input 'cfg' is not checked by number_error in validate_inputs",
    ]
