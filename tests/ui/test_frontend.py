"""The example workflows in ComfyUI's own front end, in a real (headless) Chromium.

drive.js loads every workflows/*.json the way a dropped file is loaded, reports what the app made of it
(missing node types, dialogs, page errors, layout, the API prompt from app.graphToPrompt()), then makes it
small through the widgets, queues it through the app and reports what the nodes show after the run; these
tests judge that report against the committed API twins (workflows/api/*.json), which the server tests post
as they are. A second server without any model shows the missing-models dialog.

Screenshots of every graph after its run and of that dialog are written to tests/ui/output/.

Thumbnails for the template browser (workflows/<name>.jpg), docs/zero_shot_graph.png and the README's
pictures of the subject preview and the missing-models dialog are screenshots; rewrite them with

    WRITE_THUMBNAILS=1 .venv/bin/python -m pytest tests/ui

Needs Debian's /usr/bin/chromium and tests/ui/node_modules (`make ui-deps`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from blip_diffusion_nodes.tests.graphs import (  # the CPU-friendly edit the server tests use too
    SIZE_INPUTS,
    shrink,
    twin,
)
from blip_diffusion_nodes.tools.comfy_server import PACK_NAME, ComfyServer, prepare_base

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
OUTPUT = HERE / "output"  # screenshots of the runs and of the missing-models dialog
CHROMIUM = Path("/usr/bin/chromium")  # drive.js launches this one (Debian's build, no downloaded browsers)
# Small enough for the tiny test model to run each workflow in seconds: shrink()'s edit (image sizes of the
# nodes in SIZE_INPUTS, every sampler's steps), made in the browser through the widgets of those names.
SIZE, STEPS = 64, 2
WIDGET_EDITS = [f"{node_type}.{name}={SIZE}" for node_type, names in SIZE_INPUTS.items() for name in names]
WIDGET_EDITS.append(f"steps={STEPS}")
THUMB_WIDTH, THUMB_MAX_BYTES = 640, 100_000


def _browser_or_skip() -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"no {CHROMIUM}: run `make ui-deps`")
    if not (HERE / "node_modules" / "playwright-core").is_dir() or not shutil.which("node"):
        pytest.skip("no node or tests/ui/node_modules: run `make ui-deps`")


def drive(url: str, files: list[Path], *options: str, timeout: float = 900) -> dict[str, dict]:
    """Run drive.js; its JSON lines by workflow name. Its own process group, so that a timeout also ends
    the Chromium that playwright started (killing node alone would leave it running)."""
    proc = subprocess.Popen(
        ["node", str(HERE / "drive.js"), url, *options, *map(str, files)],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"drive.js still running after {timeout}s:\n{stderr[-2000:]}\n{stdout[-2000:]}")
    assert proc.returncode == 0, f"drive.js failed:\n{stderr[-4000:]}\n{stdout[-2000:]}"
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {Path(r["workflow"]).stem: r for r in results}


def report(runs: dict[str, dict], name: str) -> dict:
    run = runs[name]
    assert "error" not in run, f"drive.js could not drive {name}:\n{run['error']}"
    return run


@pytest.fixture(scope="module")
def browser_runs(request, tmp_path_factory) -> dict[str, dict]:
    """All workflows in one browser session (Chromium's start and the page load cost ~5 s each time)."""
    _browser_or_skip()
    comfy = request.getfixturevalue("comfy")  # only now: no server start just to skip
    options = [arg for edit in WIDGET_EDITS for arg in ("--set", edit)]
    OUTPUT.mkdir(exist_ok=True)
    options += ["--run-shots", str(OUTPUT)]
    if os.environ.get("WRITE_THUMBNAILS") == "1":
        options += ["--shots", str(tmp_path_factory.mktemp("shots"))]
    results = drive(comfy.url, WORKFLOWS, *options)
    assert sorted(results) == [w.stem for w in WORKFLOWS], "drive.js did not report every workflow"
    if "--shots" in options:
        write_thumbnails(results)
    return results


def nodes_by_id(prompt: dict) -> dict:
    """What ComfyUI executes: class and inputs per node id. `_meta` (titles) is display-only and is checked
    separately: the front end writes a title for every node, the twins only where one was chosen. Links are
    ["source id", output index] on both sides, and JSON numbers compare by value (1 == 1.0), so nothing else
    needs normalising."""
    return {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]} for node_id, node in prompt.items()}


names = pytest.mark.parametrize("name", [w.stem for w in WORKFLOWS])


@names
def test_loads_with_every_node_type_known(browser_runs, name):
    run = report(browser_runs, name)
    assert run["missing_node_types"] == []
    assert run["dialogs"] == [], "a dialog opened on load (missing nodes or models?)"
    assert sorted(run["loaded_types"]) == sorted(n["class_type"] for n in twin(name).values())


@names
def test_no_page_errors(browser_runs, name):
    # Only uncaught exceptions: the console has known harmless errors (404s for optional user files, and the
    # node-registry lookups that --disable-api-nodes' CSP blocks), see research notes on the front end.
    assert report(browser_runs, name)["page_errors"] == []


@names
def test_layout_is_readable(browser_runs, name):
    layout = report(browser_runs, name)["layout"]
    assert layout["undersized"] == [], "nodes smaller than the front end's minimum for their widgets"
    assert layout["overlaps"] == [], "nodes drawn on top of each other"
    assert layout["offscreen"] == [], "nodes out of view when the workflow opens"


@names
def test_front_end_prompt_is_the_twin(browser_runs, name):
    """The UI file and its API twin describe the same graph: widget order, hidden widget slots
    (control_after_generate, upload) and links all come out right only if tools/workflows.py wrote them right."""
    prompt, expected = report(browser_runs, name)["prompt"], twin(name)
    assert nodes_by_id(prompt) == nodes_by_id(expected)
    for node_id, node in expected.items():
        if "title" in node.get("_meta", {}):
            assert prompt[node_id]["_meta"]["title"] == node["_meta"]["title"]


@names
def test_queued_prompt_is_the_twin_with_the_edits(browser_runs, name):
    run = report(browser_runs, name)
    assert run["http_status"] == 200, run.get("answer")
    assert nodes_by_id(run["queued"]) == nodes_by_id(shrink(twin(name), size=SIZE, steps=STEPS))


@names
def test_queued_workflow_runs_and_saves_an_image(comfy, browser_runs, name):
    history = report(browser_runs, name)["history"]
    assert history is not None, "the prompt did not finish in time"
    assert history["status"] == "success", history["messages"]
    saved = [i for i in history["images"] if i["type"] == "output"]  # SaveImage's, not PreviewImage's (temp)
    assert saved, "no saved image in the outputs"
    image = Image.open(io.BytesIO(comfy.view(saved[0])))
    assert image.size == (SIZE, SIZE)  # it ran the edited graph


def nodes_of(name: str, class_type: str) -> list[str]:
    return [node_id for node_id, node in twin(name).items() if node["class_type"] == class_type]


@names
def test_subject_encoder_shows_what_it_encoded(browser_runs, name):
    """The Subject Encoder node shows the 224x224 image(s) it encoded (one per view), as previews. An encoder
    ComfyUI took from its cache (the same photo and settings in an earlier workflow of the session) did not run
    and sends nothing: tests/comfy/test_node_display.py checks the previews' pixels."""
    run = report(browser_runs, name)
    ran = [n for n in nodes_of(name, "BlipDiffusionSubjectEncoder") if n not in run["history"]["cached"]]
    for node_id in ran:
        previews = run["history"]["outputs"][node_id]["images"]
        assert previews and all(p["type"] == "temp" for p in previews)
        assert run["displayed"][node_id]["images"] == [[224, 224]] * len(previews)


def test_save_subject_shows_the_file_it_wrote(browser_runs):
    run = report(browser_runs, "subject_reuse")
    (node_id,) = nodes_of("subject_reuse", "BlipDiffusionSaveSubject")
    (written,) = run["history"]["outputs"][node_id]["text"]
    assert re.fullmatch(r"output/blip_diffusion/subjects/cat_\d{5}_\.safetensors", written)
    assert run["displayed"][node_id]["widgets"]["saved"] == written


@pytest.fixture(scope="module")
def bare_comfy(tmp_path_factory):
    """A ComfyUI with the pack and no model at all, as a new user's."""
    with ComfyServer(prepare_base(tmp_path_factory.mktemp("bare"))) as client:
        yield client


def expected_models(workflow: dict) -> list[dict]:
    return workflow["models"] + [m for node in workflow["nodes"] for m in node["properties"].get("models", [])]


def test_missing_models_dialog_names_folder_and_file(request, bare_comfy):
    """Without the models, opening the workflow that uses them all lists each file the loaders read in the
    front end's missing-models dialog, under its folder, with its download link (tools/workflows.py writes them
    from blip_core.layout.DOWNLOADS; with the models present, test_loads_with_every_node_type_known sees no
    dialog). The dialog offers a download only for .safetensors files; it names the others."""
    _browser_or_skip()
    OUTPUT.mkdir(exist_ok=True)
    workflow = ROOT / "workflows" / "controlnet_multi.json"
    run = report(drive(bare_comfy.url, [workflow], "--no-queue", "--dialog-shots", str(OUTPUT)), workflow.stem)
    models = expected_models(json.loads(workflow.read_text()))
    assert {m["directory"] for m in models} == {"blip_diffusion", "controlnet", "annotators"}
    assert len(models) == 7
    (dialog,) = run["dialogs"]
    for model in models:
        assert f"{model['directory']} / {model['name']}" in dialog
    assert "Invalid directory" not in dialog  # the pack registers its model folders
    assert Path(run["dialog_screenshot"]).is_file()
    if os.environ.get("WRITE_THUMBNAILS") == "1":
        write_picture(run["dialog_screenshot"], ROOT / "docs" / "missing_models.png")


def test_a_missing_node_type_is_reported(request, tmp_path):
    """Negative control for the checks above: an unknown node type must show up in the report and a dialog."""
    _browser_or_skip()
    comfy = request.getfixturevalue("comfy")
    workflow = json.loads(WORKFLOWS[0].read_text())
    workflow["nodes"][0]["type"] = "NoSuchNodeForThisTest"
    doctored = tmp_path / "doctored.json"
    doctored.write_text(json.dumps(workflow))
    run = report(drive(comfy.url, [doctored], "--no-queue"), "doctored")
    assert run["missing_node_types"] == ["NoSuchNodeForThisTest"]
    assert any("NoSuchNodeForThisTest" in text for text in run["dialogs"])


@names
def test_template_browser_serves_the_workflow_and_its_thumbnail(comfy, name):
    """ComfyUI lists custom_nodes/<pack>/workflows/*.json as templates and shows <name>.jpg as the picture."""
    assert name in comfy.get_json("/api/workflow_templates").get(PACK_NAME, [])
    status, body = comfy.request("GET", f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
    assert status == 200, f"no workflows/{name}.jpg: WRITE_THUMBNAILS=1 pytest tests/ui writes it"
    image = Image.open(io.BytesIO(body))
    assert image.format == "JPEG" and image.width == THUMB_WIDTH and len(body) < THUMB_MAX_BYTES


def write_thumbnails(results: dict[str, dict]) -> None:
    """Screenshots (zoom 1, clipped to the graph) -> workflows/<name>.jpg, docs/zero_shot_graph.png and, after
    its run, the subject_reuse graph -> docs/subject_reuse_run.png (only when its Subject Encoder ran: taken from
    ComfyUI's cache it shows no preview; run `pytest tests/ui -k subject_reuse` alone for that picture)."""
    for name, run in results.items():
        if "screenshot" not in run:  # drive.js failed on it; its tests say why
            continue
        shot = Image.open(run["screenshot"]).convert("RGB")
        thumb = shot.resize((THUMB_WIDTH, round(shot.height * THUMB_WIDTH / shot.width)), Image.LANCZOS)
        for quality in (88, 80, 72, 64):  # the largest quality that fits the size budget
            data = io.BytesIO()
            thumb.save(data, "JPEG", quality=quality, optimize=True, progressive=True)
            if data.tell() < THUMB_MAX_BYTES:
                break
        (ROOT / "workflows" / f"{name}.jpg").write_bytes(data.getvalue())
    write_picture(report(results, "zero_shot")["screenshot"], ROOT / "docs" / "zero_shot_graph.png")
    reuse = report(results, "subject_reuse")
    if not set(nodes_of("subject_reuse", "BlipDiffusionSubjectEncoder")) & set(reuse["history"]["cached"]):
        write_picture(reuse["run_screenshot"], ROOT / "docs" / "subject_reuse_run.png")


def write_picture(screenshot: str, out: Path) -> None:
    """A screenshot for the README: full detail as a 256-colour PNG (the UI has few colours: ~75 KB instead of
    ~260 KB; octree keeps the link colours, median cut shifted them)."""
    shot = Image.open(screenshot).convert("RGB")
    out.parent.mkdir(exist_ok=True)
    shot.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out, optimize=True)
