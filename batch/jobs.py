"""From an API-format workflow, a manifest and a column mapping to jobs.

A manifest is CSV (a header row) or JSONL (one JSON object a line); each row is one job. A column
sets one node input, named `NODE.INPUT` where NODE is a node id ("7"), a node title ("Subject
photo") or a class type used once in the workflow ("BlipDiffusionSampler"). A mapping (a JSON
file or --map options) gives friendlier column names: {"category": "3.subject", "sku": null};
null keeps a column in the sidecars only. Other columns are used as NODE.INPUT when they
resolve, and are errors otherwise.

The `image` input of LoadImage / LoadImageMask takes a file path (relative paths are relative
to the manifest's folder): the worker uploads the file and sets the uploaded name. Other values
are converted to the type of the value the workflow holds (int, float, bool, str).

A job's key is the SHA-256 of the prompt it posts (without `_meta`), with each uploaded image
written as the SHA-256 of its content: the same workflow and the same inputs give the same key,
whatever the row's position or its metadata columns.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_INPUTS = {("LoadImage", "image"), ("LoadImageMask", "image")}
# Leading bytes of the image formats ComfyUI's LoadImage (Pillow) reads.
IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)
DEFAULT_NAME = "{row:05d}_{key}"
KEY_CHARS_IN_NAME = 12
EXTRA = "\0extra"  # where csv puts the fields of a row longer than the header


class BatchError(Exception):
    """A problem with the workflow, the manifest as a whole or the mapping: nothing can run."""


class RowError(Exception):
    """A problem with one manifest row: that row fails, the others run."""


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _without_meta(prompt: dict) -> dict:
    return {node_id: {k: v for k, v in node.items() if k != "_meta"} for node_id, node in prompt.items()}


def workflow_sha256(workflow: dict) -> str:
    """SHA-256 of the workflow's canonical JSON (sorted keys, no spaces), node titles (`_meta`) left out."""
    return hashlib.sha256(canonical_json(_without_meta(workflow))).hexdigest()


def load_workflow(path: str | Path) -> dict:
    """An API-format workflow ({node id: {"class_type", "inputs"}}), checked."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BatchError(f"workflow {path}: {e}") from e
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise BatchError(
            f"workflow {path} is in ComfyUI's UI format: save it with 'Export (API)' (Workflow menu) and pass that file"
        )
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]  # the body of a POST /prompt
    if (
        not isinstance(data, dict)
        or not data
        or not all(
            isinstance(n, dict) and isinstance(n.get("class_type"), str) and isinstance(n.get("inputs"), dict)
            for n in data.values()
        )
    ):
        raise BatchError(f"workflow {path} is not an API-format workflow ({{node id: {{class_type, inputs}}}})")
    return data


@dataclass(frozen=True)
class Target:
    """One widget input of one node."""

    node_id: str
    input: str
    class_type: str
    kind: str  # "image" (uploaded file), "int", "float", "bool" or "str"

    def __str__(self) -> str:
        return f"{self.node_id}.{self.input}"


def resolve_target(workflow: dict, spec: str) -> Target:
    """NODE.INPUT -> Target. NODE: a node id, else a node title, else a class type used once."""
    if "." not in spec:
        raise BatchError(f"'{spec}' is not NODE.INPUT (e.g. 7.seed or 'Subject photo.image')")
    node_ref, input_name = spec.rsplit(".", 1)  # titles may hold dots, input names do not
    if node_ref in workflow:
        matches, how = [node_ref], "id"
    else:
        matches = [i for i, n in workflow.items() if n.get("_meta", {}).get("title") == node_ref]
        how = "title"
        if not matches:
            matches, how = [i for i, n in workflow.items() if n["class_type"] == node_ref], "class type"
    if not matches:
        raise BatchError(f"'{spec}': no node with id, title or class type '{node_ref}' in the workflow")
    if len(matches) > 1:
        raise BatchError(
            f"'{spec}': {len(matches)} nodes have the {how} '{node_ref}' ({', '.join(matches)}): "
            "name the node by its id"
        )
    node_id = matches[0]
    node = workflow[node_id]
    inputs = node["inputs"]
    if input_name not in inputs:
        raise BatchError(
            f"'{spec}': node {node_id} ({node['class_type']}) has no input '{input_name}'; "
            f"its inputs: {', '.join(inputs)}"
        )
    value = inputs[input_name]
    if isinstance(value, list):
        raise BatchError(
            f"'{spec}': input '{input_name}' of node {node_id} ({node['class_type']}) is connected to "
            f"node {value[0]}; a manifest sets widget values only"
        )
    if (node["class_type"], input_name) in IMAGE_INPUTS:
        kind = "image"
    elif isinstance(value, bool):
        kind = "bool"
    elif isinstance(value, (int, float, str)):
        kind = type(value).__name__
    else:
        raise BatchError(f"'{spec}': the workflow's value {value!r} is not a number, text or boolean")
    return Target(node_id, input_name, node["class_type"], kind)


def convert(value: Any, target: Target, column: str) -> Any:
    """A manifest cell as the target input's type; RowError naming the column otherwise."""
    where = f"column '{column}' ({target})"
    if value is None or (isinstance(value, str) and not value.strip() and target.kind != "str"):
        raise RowError(f"{where}: empty")
    if target.kind in ("str", "image"):
        if isinstance(value, (dict, list)):
            raise RowError(f"{where}: expected text, got {json.dumps(value)[:80]}")
        return value if isinstance(value, str) else json.dumps(value)
    if target.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise RowError(f"{where}: {value!r} is not a boolean (true/false)")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowError(f"{where}: {value!r} is not a number")
    if target.kind == "int":
        # int() on the text, not float(): seeds go up to 2**64 and a float would round them.
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        elif float(value).is_integer():
            return int(value)
        raise RowError(f"{where}: {value!r} is not a whole number")
    try:
        return float(value)
    except ValueError:
        raise RowError(f"{where}: {value!r} is not a number") from None


class Mapping:
    """Which column sets which input: the explicit mapping first, then NODE.INPUT column names."""

    def __init__(self, workflow: dict, explicit: dict[str, str | None] | None = None):
        self.workflow = workflow
        self.targets: dict[str, Target | None] = {}
        for column, spec in (explicit or {}).items():
            try:
                self.targets[column] = resolve_target(workflow, spec) if spec else None
            except BatchError as e:
                raise BatchError(f"mapping for column '{column}': {e}") from None
        seen: dict[Target, str] = {}
        for column, target in self.targets.items():
            if target is not None and target in seen:
                raise BatchError(f"mapping: columns '{seen[target]}' and '{column}' both set {target}")
            if target is not None:
                seen[target] = column

    def target(self, column: str) -> Target | None:
        """The input a column sets (None: metadata only). RowError for a column that sets nothing known."""
        if column not in self.targets:
            if "." not in column:
                raise RowError(
                    f"unknown column '{column}': map it to an input (--map {column}=NODE.INPUT, or "
                    f"--map {column}= to keep it as metadata) or name the column NODE.INPUT"
                )
            try:
                self.targets[column] = resolve_target(self.workflow, column)
            except BatchError as e:
                raise RowError(f"unknown column {e}") from None
        return self.targets[column]


def load_mapping(path: str | Path | None, options: Iterable[str] = ()) -> dict[str, str | None]:
    """A mapping file ({"column": "NODE.INPUT" or null}) plus --map COLUMN=NODE.INPUT options (these win)."""
    mapping: dict[str, str | None] = {}
    if path:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BatchError(f"mapping {path}: {e}") from e
        if not isinstance(data, dict) or not all(isinstance(v, (str, type(None))) for v in data.values()):
            raise BatchError(f'mapping {path}: expected a JSON object {{"column": "NODE.INPUT" or null}}')
        mapping.update(data)
    for option in options:
        column, sep, spec = option.partition("=")
        if not sep or not column:
            raise BatchError(f"--map {option}: expected COLUMN=NODE.INPUT (or COLUMN= to keep it as metadata)")
        mapping[column] = spec or None
    return mapping


def apply_overrides(workflow: dict, options: Iterable[str]) -> dict:
    """The workflow with --set NODE.INPUT=VALUE applied (an image input takes a name in ComfyUI's input folder)."""
    workflow = copy.deepcopy(workflow)
    for option in options:
        spec, sep, value = option.partition("=")
        if not sep:
            raise BatchError(f"--set {option}: expected NODE.INPUT=VALUE")
        target = resolve_target(workflow, spec)
        try:
            workflow[target.node_id]["inputs"][target.input] = convert(value, target, "--set")
        except RowError as e:
            raise BatchError(f"--set {option}: {e}") from None
    return workflow


@dataclass
class Row:
    number: int  # 1-based data row (the CSV header and blank JSONL lines are not counted)
    values: dict[str, Any]
    error: str | None = None


def read_manifest(path: str | Path) -> tuple[list[str] | None, list[Row]]:
    """(CSV header or None for JSONL, rows). A malformed row becomes a Row with `error` set."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often write a byte-order mark
    except (OSError, UnicodeDecodeError) as e:
        raise BatchError(f"manifest {path}: {e}") from e
    rows: list[Row] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""), restkey=EXTRA)  # quoted cells may hold newlines
        header = list(reader.fieldnames or [])
        if not header:
            raise BatchError(f"manifest {path}: no header row")
        duplicates = sorted({c for c in header if header.count(c) > 1})
        if duplicates:
            raise BatchError(f"manifest {path}: the header names {', '.join(duplicates)} more than once")
        for number, values in enumerate(reader, 1):
            row = Row(number, {k: v for k, v in values.items() if k != EXTRA})
            if EXTRA in values:
                row.error = f"{len(header) + len(values[EXTRA])} fields, the header has {len(header)}"
            elif None in values.values():
                row.error = f"fewer fields than the header's {len(header)}"
            rows.append(row)
        return header, rows
    if suffix in (".jsonl", ".ndjson"):
        for line in text.splitlines():
            if not line.strip():
                continue
            number = len(rows) + 1
            try:
                values = json.loads(line)
            except ValueError as e:
                rows.append(Row(number, {}, f"not valid JSON: {e}"))
                continue
            if not isinstance(values, dict):
                rows.append(Row(number, {}, "not a JSON object"))
            else:
                rows.append(Row(number, values))
        return None, rows
    raise BatchError(f"manifest {path}: expected a .csv or .jsonl file")


@dataclass
class ImageInput:
    node_id: str
    input: str
    path: Path
    sha256: str
    ext: str


@dataclass
class Job:
    row: int
    values: dict[str, Any]  # the manifest row as read: it goes into every sidecar
    prompt: dict  # the workflow with the row's values; uploaded images are set by the worker
    images: list[ImageInput]
    key: str
    name: str  # output files are NAME_00.png, NAME_01.png, ...
    columns: dict[tuple[str, str], str] = field(default_factory=dict)  # (node id, input) -> the column that set it
    inputs: dict[str, Any] = field(default_factory=dict)  # "NODE.INPUT" -> the value set (an image: its path)


@dataclass
class Failure:
    row: int
    values: dict[str, Any]
    message: str
    key: str | None = None


def _template_fields(template: str) -> set[str]:
    try:
        return {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise BatchError(f"--name {template!r}: {e}") from e


def _image_facts(path: Path, cache: dict[Path, tuple[str, str]]) -> tuple[str, str]:
    """(sha256, extension) of an image file, read once per path."""
    if path not in cache:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RowError(f"cannot read {path}: {e.strerror or e}") from None
        ext = next(
            (e for magic, e in IMAGE_MAGIC if data.startswith(magic)),
            ".webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None,
        )
        if ext is None:
            raise RowError(f"{path} is not a PNG, JPEG, WebP, GIF, BMP or TIFF image")
        suffix = path.suffix.lower()
        cache[path] = (hashlib.sha256(data).hexdigest(), suffix if suffix in (".jpeg", ".tiff") else ext)
    return cache[path]


def plan_jobs(
    workflow: dict,
    mapping: Mapping,
    rows: list[Row],
    manifest_dir: Path,
    name_template: str = DEFAULT_NAME,
    header: list[str] | None = None,
) -> tuple[list[Job], list[Failure]]:
    """One Job per good row, one Failure per bad row (with a message naming the column and the problem).

    With a CSV `header`, a column that maps to nothing or a --name field that is no column stops everything
    (BatchError): it would fail every row.
    """
    fields = _template_fields(name_template)
    if header is not None:
        for column in header:
            try:
                mapping.target(column)
            except RowError as e:
                raise BatchError(f"manifest header: {e}") from None
        missing = fields - {"row", "key"} - set(header)
        if missing:
            raise BatchError(f"--name {name_template!r}: {', '.join(sorted(missing))} is not a manifest column")
    jobs: list[Job] = []
    failures: list[Failure] = []
    image_cache: dict[Path, tuple[str, str]] = {}
    by_key: dict[str, int] = {}
    by_name: dict[str, int] = {}
    for row in rows:
        try:
            if row.error:
                raise RowError(row.error)
            job = _plan_row(workflow, mapping, row, manifest_dir, name_template, image_cache)
            if job.key in by_key:
                raise RowError(f"same inputs as row {by_key[job.key]}: it would render the same images")
            if job.name in by_name:
                raise RowError(f"output name '{job.name}' is also row {by_name[job.name]}'s: make --name unique")
        except RowError as e:
            failures.append(Failure(row.number, row.values, f"row {row.number}: {e}"))
            continue
        by_key[job.key], by_name[job.name] = row.number, row.number
        jobs.append(job)
    return jobs, failures


def _plan_row(
    workflow: dict,
    mapping: Mapping,
    row: Row,
    manifest_dir: Path,
    name_template: str,
    image_cache: dict[Path, tuple[str, str]],
) -> Job:
    prompt = copy.deepcopy(workflow)
    images: list[ImageInput] = []
    columns: dict[tuple[str, str], str] = {}
    inputs: dict[str, Any] = {}
    for column, value in row.values.items():
        target = mapping.target(column)
        if target is None:
            continue
        slot = (target.node_id, target.input)
        if slot in columns:
            raise RowError(f"columns '{columns[slot]}' and '{column}' both set {target}")
        columns[slot] = column
        value = convert(value, target, column)
        if target.kind == "image":
            path = (manifest_dir / Path(value).expanduser()).resolve()
            if not path.is_file():
                raise RowError(f"column '{column}' ({target}): no image file {path}")
            try:
                sha256, ext = _image_facts(path, image_cache)
            except RowError as e:
                raise RowError(f"column '{column}' ({target}): {e}") from None
            images.append(ImageInput(target.node_id, target.input, path, sha256, ext))
            inputs[str(target)] = str(path)
            value = f"sha256:{sha256}"  # what the key sees; the worker sets the uploaded name
        else:
            inputs[str(target)] = value
        prompt[target.node_id]["inputs"][target.input] = value
    key = hashlib.sha256(canonical_json(_without_meta(prompt))).hexdigest()
    fields = {k: v for k, v in row.values.items() if isinstance(k, str)}
    try:
        name = name_template.format_map({**fields, "row": row.number, "key": key[:KEY_CHARS_IN_NAME]})
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise RowError(f"--name {name_template!r}: {e.__class__.__name__}: {e}") from None
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not name:
        raise RowError(f"--name {name_template!r} gives an empty file name")
    return Job(row.number, row.values, prompt, images, key, name, columns, inputs)
