"""The batch runner's planning and output folder, without Ray or ComfyUI: mapping, conversion, keys, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from blip_diffusion_nodes.batch.jobs import (
    BatchError,
    Mapping,
    apply_overrides,
    load_mapping,
    load_workflow,
    plan_jobs,
    read_manifest,
    resolve_target,
)
from blip_diffusion_nodes.batch.run import main
from blip_diffusion_nodes.batch.store import OutputStore
from blip_diffusion_nodes.tests.comfy.reliability import covers
from blip_diffusion_nodes.tests.graphs import zero_shot

pytestmark = pytest.mark.batch

ROOT = Path(__file__).resolve().parents[2]
CAT = ROOT / "workflows" / "images" / "blipd_example_cat.jpg"
CUP = ROOT / "workflows" / "images" / "blipd_example_cup.jpg"
MAPPING = {"image": "Subject photo.image", "category": "3.subject", "prompt": "4.prompt", "seed": "7.seed", "sku": None}


@pytest.fixture
def workflow() -> dict:
    graph = zero_shot("blipdiffusion", size=64, steps=2)
    graph["2"]["_meta"] = {"title": "Subject photo"}
    return graph


def plan(workflow: dict, folder: Path, name: str, text: str, mapping=MAPPING, template: str = "{row:05d}_{key}"):
    (folder / name).write_text(text)
    header, rows = read_manifest(folder / name)
    return plan_jobs(workflow, Mapping(workflow, mapping), rows, folder, template, header)


def test_targets_by_id_title_and_class(workflow):
    assert str(resolve_target(workflow, "7.seed")) == "7.seed"
    assert resolve_target(workflow, "Subject photo.image").kind == "image"
    assert resolve_target(workflow, "BlipDiffusionSampler.cfg").kind == "float"
    assert resolve_target(workflow, "EmptyLatentImage.width").kind == "int"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("seed", "is not NODE.INPUT"),
        ("42.seed", "no node with id, title or class type '42'"),
        ("7.sead", "has no input 'sead'; its inputs: model, positive"),
        ("3.image", "is connected to node 2"),
    ],
)
def test_target_errors_say_what_is_wrong(workflow, spec, message):
    with pytest.raises(BatchError, match=message):
        resolve_target(workflow, spec)


def test_ambiguous_class_type_asks_for_the_id(workflow):
    with pytest.raises(BatchError, match=r"2 nodes have the class type 'CLIPTextEncode' \(5, 10\)"):
        resolve_target({**workflow, "10": json.loads(json.dumps(workflow["5"]))}, "CLIPTextEncode.text")


def test_ui_format_workflow_is_refused_with_the_fix(tmp_path):
    (tmp_path / "ui.json").write_text(json.dumps({"nodes": [], "links": []}))
    with pytest.raises(BatchError, match="Export \\(API\\)"):
        load_workflow(tmp_path / "ui.json")


def test_values_take_the_workflows_types(workflow, tmp_path):
    jobs, failures = plan(
        workflow,
        tmp_path,
        "m.csv",
        "7.seed,7.cfg,4.prompt,EmptyLatentImage.width\n18446744073709551615,4.5,a red hat,128\n",
        mapping={},
    )
    assert not failures
    inputs = jobs[0].prompt
    assert inputs["7"]["inputs"]["seed"] == 2**64 - 1  # exact: no float on the way
    assert inputs["7"]["inputs"]["cfg"] == 4.5 and inputs["6"]["inputs"]["width"] == 128
    assert inputs["4"]["inputs"]["prompt"] == "a red hat"


@covers("batch-missing-image", "batch-unknown-column", "batch-duplicate-rows")
def test_bad_rows_fail_alone_with_the_column_named(workflow, tmp_path):
    shutil.copy(CAT, tmp_path / "cat.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    rows = [
        {"image": "cat.jpg", "category": "cat", "prompt": "p", "seed": 1},
        {"image": "missing.jpg", "category": "cat", "prompt": "p", "seed": 2},
        {"image": "notes.txt", "category": "cat", "prompt": "p", "seed": 3},
        {"image": "cat.jpg", "category": "cat", "prompt": "p", "seed": "three"},
        {"image": "cat.jpg", "category": "cat", "prompt": "p", "seed": 5, "colour": "red"},
        {"image": "cat.jpg", "category": "cat", "prompt": "p", "seed": 1, "sku": "other"},
        {"image": "", "category": "cat", "prompt": "p", "seed": 7},
    ]
    jobs, failures = plan(workflow, tmp_path, "m.jsonl", "\n".join(map(json.dumps, rows)) + "\n{oops\n")
    assert [j.row for j in jobs] == [1]
    messages = {f.row: f.message for f in failures}
    assert "row 2: column 'image' (2.image): no image file" in messages[2] and "missing.jpg" in messages[2]
    assert "notes.txt is not a PNG, JPEG" in messages[3]
    assert "row 4: column 'seed' (7.seed): 'three' is not a whole number" in messages[4]
    assert messages[5] == (
        "row 5: unknown column 'colour': map it to an input (--map colour=NODE.INPUT, or "
        "--map colour= to keep it as metadata) or name the column NODE.INPUT"
    )
    assert "row 6: same inputs as row 1" in messages[6]
    assert "row 7: column 'image' (2.image): empty" in messages[7]
    assert "row 8: not valid JSON" in messages[8]


@covers("batch-unknown-column")
def test_csv_header_with_an_unknown_column_stops_everything(workflow, tmp_path):
    with pytest.raises(BatchError, match="manifest header: unknown column 'colour'"):
        plan(workflow, tmp_path, "m.csv", "image,category,prompt,seed,colour\ncat.jpg,cat,p,1,red\n")


def test_csv_quoted_cells_keep_commas_and_newlines(workflow, tmp_path):
    jobs, failures = plan(
        workflow, tmp_path, "m.csv", '4.prompt,7.seed\n"on a beach, at dusk\nwide shot",1\n', mapping={}
    )
    assert not failures and jobs[0].prompt["4"]["inputs"]["prompt"] == "on a beach, at dusk\nwide shot"


def test_csv_row_longer_than_the_header(workflow, tmp_path):
    shutil.copy(CAT, tmp_path / "cat.jpg")
    _, failures = plan(workflow, tmp_path, "m.csv", "image,category,prompt,seed\ncat.jpg,cat,p,1,extra\n")
    assert failures[0].message == "row 1: 5 fields, the header has 4"


def test_key_is_the_inputs_not_the_row(workflow, tmp_path):
    shutil.copy(CAT, tmp_path / "a.jpg")
    shutil.copy(CAT, tmp_path / "b.jpg")  # same content under another name
    shutil.copy(CUP, tmp_path / "c.jpg")
    jobs, failures = plan(
        workflow,
        tmp_path,
        "m.csv",
        "image,category,prompt,seed,sku\na.jpg,cat,p,1,X\nc.jpg,cat,p,1,X\na.jpg,cat,p,2,X\na.jpg,cat,q,1,X\n",
    )
    moved, _ = plan(workflow, tmp_path, "n.csv", "sku,seed,prompt,category,image\nY,2,p,cat,b.jpg\nZ,1,p,cat,b.jpg\n")
    assert not failures and len({j.key for j in jobs}) == 4
    assert [j.key for j in moved] == [jobs[2].key, jobs[0].key]  # other rows, order, metadata and file name
    other = apply_overrides(workflow, ["7.steps=3"])
    again, _ = plan(other, tmp_path, "m.csv", (tmp_path / "m.csv").read_text())
    assert not {j.key for j in again} & {j.key for j in jobs}  # another workflow: other keys


def test_names_from_a_template(workflow, tmp_path):
    shutil.copy(CAT, tmp_path / "a.jpg")
    jobs, failures = plan(
        workflow,
        tmp_path,
        "m.csv",
        "image,category,prompt,seed,sku\na.jpg,cat,p,1,shop/A 1\na.jpg,cat,p,2,shop/A 1\n",
        template="{sku}",
    )
    assert jobs[0].name == "shop_A_1"
    assert failures[0].message == "row 2: output name 'shop_A_1' is also row 1's: make --name unique"
    with pytest.raises(BatchError, match="skew is not a manifest column"):
        plan(workflow, tmp_path, "m.csv", "image,category,prompt,seed,sku\na.jpg,cat,p,1,A\n", template="{skew}")


def test_mapping_file_and_options(workflow, tmp_path):
    (tmp_path / "map.json").write_text(json.dumps({"photo": "2.image", "sku": None}))
    mapping = load_mapping(tmp_path / "map.json", ["seed=7.seed", "photo=Subject photo.image"])
    assert mapping == {"photo": "Subject photo.image", "sku": None, "seed": "7.seed"}
    with pytest.raises(BatchError, match="columns 'a' and 'b' both set 7.seed"):
        Mapping(workflow, {"a": "7.seed", "b": "BlipDiffusionSampler.seed"})


@covers("batch-killed-while-writing", "batch-second-run")
def test_store_writes_whole_files_once_and_resumes(tmp_path):
    store = OutputStore(tmp_path)
    with pytest.raises(BatchError, match="another batch run is writing"):
        OutputStore(tmp_path)
    files = store.write_job("job", [(".png", b"png-bytes", {"row": 1})], {"key": "k1", "row": 1})
    assert files == ["job_00.png", "job_00.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".batch.lock", "batch_journal.jsonl", *sorted(files)]
    assert json.loads((tmp_path / "job_00.json").read_text()) == {"row": 1, "file": "job_00.png"}
    store.record_failure({"key": "k2", "row": 2, "error": "bad"})
    store.close()
    (tmp_path / ".other_00.png.partial").write_bytes(b"half")  # a run killed while writing
    with open(tmp_path / "batch_journal.jsonl", "a") as f:
        f.write('{"key": "k3", "status": "do')  # and while journaling
    store = OutputStore(tmp_path)
    assert store.is_done("k1") and not store.is_done("k2") and not store.is_done("k3")
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))
    (tmp_path / "job_00.png").unlink()
    assert not store.is_done("k1")  # a deleted output is made again
    store.close()


def test_cli_says_why_nothing_can_run(tmp_path, workflow, capsys):
    (tmp_path / "wf.json").write_text(json.dumps(workflow))
    (tmp_path / "m.csv").write_text("image,category,colour\ncat.jpg,cat,red\n")
    code = main(
        [
            str(tmp_path / "wf.json"),
            str(tmp_path / "m.csv"),
            "--out",
            str(tmp_path / "out"),
            "--map",
            "image=2.image",
            "--map",
            "category=3.subject",
        ]
    )
    assert code == 2
    assert "batch: manifest header: unknown column 'colour'" in capsys.readouterr().err
