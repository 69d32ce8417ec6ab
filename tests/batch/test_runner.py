"""The batch runner end to end: real Ray, two real ComfyUI workers, the tiny model (issue 17).

Every output must be there once, match its row (the prompt ComfyUI embedded in the PNG holds the
row's seed, category and prompt), and carry a correct sidecar, whatever happens to the workers.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from blip_diffusion_nodes.tests.batch.runner_helpers import (
    done_keys,
    executing,
    journal,
    manifest_rows,
    run_runner,
    runner_command,
    wait_for,
    worker_servers,
    write_csv,
)
from blip_diffusion_nodes.tests.comfy.reliability import covers

pytestmark = [pytest.mark.batch, pytest.mark.slow]


def workflow_sha256(path: Path) -> str:
    """The sidecar's workflow hash as documented: canonical JSON (sorted keys, no spaces) without `_meta`."""
    graph = {k: {f: v for f, v in node.items() if f != "_meta"} for k, node in json.loads(path.read_text()).items()}
    return hashlib.sha256(json.dumps(graph, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_outputs(out: Path, rows: list[dict], workflow: Path) -> list[dict]:
    """One image and one sidecar per row, nothing else; each image is its row's. Returns the sidecars."""
    pngs = sorted(out.glob("*.png"))
    sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
    assert len(pngs) == len(rows), [p.name for p in pngs]
    assert sorted(s["row"] for s in sidecars) == list(range(1, len(rows) + 1))
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    assert len({s["key"] for s in sidecars}) == len(rows)
    wf_hash = workflow_sha256(workflow)
    for png, sidecar in zip(pngs, sidecars):
        row = rows[sidecar["row"] - 1]
        assert sidecar["values"] == row and sidecar["file"] == png.name
        assert sidecar["workflow_sha256"] == wf_hash
        assert sidecar["inputs"]["7.seed"] == int(row["seed"]) and sidecar["inputs"]["3.subject"] == row["category"]
        assert sidecar["worker"]["name"] in ("w0", "w1") and sidecar["timings"]["execute_s"] > 0
        with Image.open(png) as image:
            assert image.size == (64, 64)
            posted = json.loads(image.text["prompt"])  # what ComfyUI ran for this file
        assert posted["7"]["inputs"]["seed"] == int(row["seed"])
        assert posted["3"]["inputs"]["subject"] == row["category"]
        assert posted["4"]["inputs"]["prompt"] == row["prompt"]
        assert posted["2"]["inputs"]["image"].startswith("blipd_batch/")
    keys = done_keys(out)
    assert sorted(keys) == sorted(s["key"] for s in sidecars)  # each job journaled once
    return sidecars


def test_twelve_jobs_on_two_workers(batch_inputs, comfy_base, tmp_path, env_for_runner):
    rows = manifest_rows(12)
    manifest = write_csv(batch_inputs / "twelve.csv", rows)
    result = run_runner(runner_command(batch_inputs, manifest, tmp_path / "out", comfy_base))
    assert result.returncode == 0, result.stderr
    sidecars = check_outputs(tmp_path / "out", rows, batch_inputs / "workflow.json")
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert (summary["done"], summary["failed"], summary["skipped"]) == (12, 0, 0)
    assert {w["name"]: w["jobs"] for w in summary["workers"]} == {
        name: sum(s["worker"]["name"] == name for s in sidecars) for name in ("w0", "w1")
    }
    assert all(w["jobs"] > 0 for w in summary["workers"])
    assert "worker  host" in result.stderr and "done 12, failed 0" in result.stderr
    assert not (comfy_base / "input" / "blipd_batch").exists()  # the workers' uploads are gone


@covers("batch-server-killed", "batch-worker-killed")
def test_killed_server_and_killed_worker_lose_nothing(batch_inputs, comfy_base, tmp_path, env_for_runner):
    """Mid-job: one worker's ComfyUI is killed, later the other worker's actor process. Every job finishes once."""
    rows = manifest_rows(12)
    manifest = write_csv(batch_inputs / "kill.csv", rows)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        runner_command(batch_inputs, manifest, out, comfy_base),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: len(done_keys(out)) >= 2, 600, "2 jobs done", proc)
        server, _, server_killed = wait_for(
            lambda: next((s for s in worker_servers() if executing(s[1])), None), 120, "a server executing a job", proc
        )
        server.kill()
        done_at_kill = len(done_keys(out))
        wait_for(lambda: len(done_keys(out)) >= done_at_kill + 2, 600, "2 more jobs", proc)
        actor_server, _, actor_killed = wait_for(
            lambda: next((s for s in worker_servers() if s[2] != server_killed and executing(s[1])), None),
            120,
            "the other worker executing a job",
            proc,
        )
        actor_server.parent().kill()  # the Ray actor process that owns this server
        wait_for(
            lambda: not actor_server.is_running() or actor_server.status() == "zombie",
            30,
            "the killed actor's ComfyUI to exit with it",
        )
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(output)
    assert proc.returncode == 0, output
    sidecars = check_outputs(out, rows, batch_inputs / "workflow.json")
    summary = json.loads((out / "batch_summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (12, 0)
    workers = {w["name"]: w for w in summary["workers"]}
    assert all(w["error"] is None for w in workers.values())  # both came back
    assert workers[server_killed]["lost"] >= 1 and workers[server_killed]["server_starts"] >= 2
    assert workers[actor_killed]["lost"] >= 1 and workers[actor_killed]["actor_restarts"] == 1
    assert sum(s["attempt"] == 2 for s in sidecars) >= 2  # the jobs that were running were run again
    assert "retrying" in output


@covers("batch-interrupted")
def test_interrupted_run_resumes_with_the_rest(batch_inputs, comfy_base, tmp_path, env_for_runner):
    rows = manifest_rows(24)  # enough that Ctrl-C after the third lands mid-run on a fast, quiet machine too
    manifest = write_csv(batch_inputs / "resume.csv", rows)
    out = tmp_path / "out"
    command = runner_command(batch_inputs, manifest, out, comfy_base)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(done_keys(out)) >= 3, 600, "3 jobs done", proc)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(output)
    assert proc.returncode == 130, output
    first = done_keys(out)
    assert 3 <= len(first) < len(rows), "the run was not interrupted before its end"
    assert "run the same command again" in output
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert len(kept) == len(first)

    result = run_runner(command[: command.index("--workers") + 1] + ["1"] + command[command.index("--workers") + 2 :])
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "batch_summary.json").read_text())
    assert (summary["skipped"], summary["done"], summary["failed"]) == (len(first), len(rows) - len(first), 0)
    check_outputs(out, rows, batch_inputs / "workflow.json")
    assert {
        n: v for n, v in ((p.name, (p.stat().st_ino, p.stat().st_mtime_ns)) for p in out.glob("*.png")) if n in kept
    } == kept  # the first run's files were not written again


@covers(
    "batch-missing-image", "batch-empty-category", "batch-unknown-column", "batch-bad-number", "batch-runtime-error"
)
def test_bad_rows_fail_with_clear_messages_and_the_rest_finish(batch_inputs, comfy_base, tmp_path, env_for_runner):
    good = manifest_rows(3)
    rows = [
        good[0],
        {**good[1], "image": "no_such_photo.jpg"},
        {**good[1], "category": ""},
        {**good[1], "colour": "red"},
        good[1],
        {**good[2], "seed": "abc"},
        good[2],
        {**good[2], "seed": "9", "4.image_weights": "1, 2"},
    ]  # NODE.INPUT as a name; fails while running
    manifest = batch_inputs / "bad_rows.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_runner(runner_command(batch_inputs, manifest, tmp_path / "out", comfy_base, 1))
    assert result.returncode == 1, result.stderr
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (3, 5)
    errors = {f["row"]: f["error"] for f in summary["failures"]}
    assert errors[2].startswith("row 2: column 'image' (2.image): no image file ")
    assert errors[2].endswith("no_such_photo.jpg")
    assert errors[3].startswith(
        "row 3: ComfyUI refused the prompt: node 3 (BlipDiffusionSubjectEncoder) input 'subject' (column 'category')"
    )
    assert "the category is empty" in errors[3]
    assert errors[4].startswith("row 4: unknown column 'colour'")
    assert errors[6] == "row 6: column 'seed' (7.seed): 'abc' is not a whole number"
    assert errors[8] == (
        "row 8: node 4 (BlipDiffusionMultimodalPromptFuse) raised ValueError: image_weights: "
        "expected 1 weights (one per subject image), got 2: '1, 2'"
    )
    for message in errors.values():
        assert f"failed: {message}" in result.stderr
    assert "retrying" not in result.stderr  # the job's own errors are not retried
    assert sorted(r["row"] for r in journal(tmp_path / "out") if r["status"] == "failed") == [2, 3, 4, 6, 8]
    assert summary["workers"][0]["failed"] == 2  # the two ComfyUI saw: rows 3 and 8
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert sorted(json.loads(p.with_suffix(".json").read_text())["row"] for p in pngs) == [1, 5, 7]


@covers("batch-hung-job")
def test_a_hung_job_is_retried_then_given_up(batch_inputs, comfy_base, tmp_path, env_for_runner):
    """A job that outlives --job-timeout counts as a hung server: restarted, retried --retries times, then failed."""
    manifest = write_csv(batch_inputs / "hung.csv", manifest_rows(1))
    result = run_runner(
        runner_command(
            batch_inputs, manifest, tmp_path / "out", comfy_base, 1, "--job-timeout", "0.5", "--retries", "1"
        )
    )
    assert result.returncode == 1, result.stderr
    summary = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert (summary["done"], summary["failed"]) == (0, 1)
    error = summary["failures"][0]["error"]
    assert error.startswith("row 1: gave up after 2 attempts: ComfyUI on worker w0 stopped answering (prompt ")
    assert "not finished after 0.5 s" in error and "the end of that ComfyUI's log" in error
    assert "row 1: retrying" in result.stderr
    assert summary["workers"][0]["server_starts"] == 2 and summary["workers"][0]["lost"] == 2
    assert not list((tmp_path / "out").glob("*.png"))
