"""Write the UI-format workflows (workflows/*.json) from their API-format twins (workflows/api/*.json).

    python tools/workflows.py          # starts a headless ComfyUI for /object_info, rewrites workflows/*.json

The API twin is the source: tests post it as it is. The UI file (LiteGraph workflow v0.4,
what ComfyUI's template browser serves and the front end loads) is laid out in columns by
graph depth; widget values follow each node's input order from /object_info. The browser
test (tests/ui) checks that the front end turns every UI file back into exactly its twin and
that the layout fits the front end's node sizes.

Each UI file also lists the model files its loaders read, with their folder and download link
(blip_core.layout.DOWNLOADS), as the front end's missing-models dialog reads them: the front end
looks each file up in its model folder and lists the absent ones when the workflow opens.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from blip_diffusion_nodes.blip_core.layout import (
    BLIP_DIFFUSION,
    BLIP_DIFFUSION_CANNY,
    HED_ANNOTATOR,
    SCRIBBLE_CONTROLNET,
    Download,
)

ROOT = Path(__file__).resolve().parents[1]

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# LiteGraph's geometry (front end 1.32): a node's body (title bar excluded) is one 20 px row per input/output
# socket pair, 24 px per widget and 14 px of padding (10 more here, for air). The browser test checks that
# every node is at least the front end's own minimum size and that no two nodes overlap.
SLOT_HEIGHT, WIDGET_HEIGHT, BODY_PADDING, TITLE_HEIGHT = 20, 24, 24, 30
MULTILINE_HEIGHT = 110  # a text box of about five lines
IMAGE_PREVIEW_HEIGHT = 250  # the picture a LoadImage shows, and the result a SaveImage shows after a run
IMAGE_OUTPUT_NODES = {"SaveImage", "PreviewImage", "BlipDiffusionSubjectEncoder"}  # show images after a run
NODE_WIDTH, WIDE_NODE_WIDTH = 320, 400  # nodes with a text box get the front end's default width for them
TITLE_CHAR_WIDTH = 7.6  # the front end widens a node to its title: ~7.3 px a character in its default font
COLUMN_BUDGET, COLUMN_GAP, ROW_GAP = 900, 50, 30  # px; ROW_GAP is free space between a node and the next title


# The loader inputs of the examples that name a model, and the downloads each can name.
MODEL_INPUTS: dict[tuple[str, str], tuple[Download, ...]] = {
    ("BlipDiffusionLoader", "model_name"): (BLIP_DIFFUSION,),
    ("BlipDiffusionControlNetLoader", "model_name"): (BLIP_DIFFUSION_CANNY, SCRIBBLE_CONTROLNET),
    ("BlipDiffusionHEDEdges", "annotator"): (HED_ANNOTATOR,),
}


def model_files(class_type: str, inputs: dict) -> tuple[list[dict], list[dict]]:
    """The front end's model entries ({name, url, directory}) for the files a node reads: (those its widget names
    itself, which go in the node's properties.models, where the front end matches them to the widget; those inside
    a folder its widget names, which go in the workflow's models: the front end compares a model's name with the
    files of its folder, so a folder can only be checked through the files in it)."""
    on_node, in_folder = [], []
    for (node_type, name), downloads in MODEL_INPUTS.items():
        value = inputs.get(name) if node_type == class_type else None
        for download in downloads:
            for file in download.files:
                entry = {"name": f"{download.name}/{file}", "url": download.url(file), "directory": download.folder}
                if value == entry["name"]:
                    on_node.append(entry)
                elif value == download.name:
                    in_folder.append(entry)
    return on_node, in_folder


def is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def input_specs(info: dict) -> list[tuple[str, list]]:
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    return [(name, specs[name]) for name in order]


def depths(prompt: dict) -> dict[str, int]:
    """Longest path from a node without inputs."""
    memo: dict[str, int] = {}

    def depth(node_id: str) -> int:
        if node_id not in memo:
            links = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
            memo[node_id] = 1 + max((depth(s) for s in links), default=-1)
        return memo[node_id]

    for node_id in prompt:
        depth(node_id)
    return memo


def layers(prompt: dict, depth: dict[str, int]) -> dict[str, int]:
    """Graph depth, except that a node without inputs sits just left of its first consumer (an empty latent
    next to the sampler, not beside the loader)."""
    consumers: dict[str, list[str]] = {n: [] for n in prompt}
    for node_id, entry in prompt.items():
        for v in entry["inputs"].values():
            if isinstance(v, list):
                consumers[v[0]].append(node_id)
    return {
        n: max(0, min(depth[c] for c in consumers[n]) - 1) if depth[n] == 0 and consumers[n] else depth[n]
        for n in prompt
    }


def columns(layer: dict[str, int], heights: dict[str, float]) -> dict[str, int]:
    """Layers left to right, but consecutive short layers share a column (stacked in layer order) while it
    stays no taller than COLUMN_BUDGET or the tallest layer: a chain like sampler -> decode -> save takes
    one column, so even a deep graph stays narrow enough to read in a thumbnail.
    Filled from the right, where the short tail layers are."""

    def height(nodes):
        return sum(heights[n] + TITLE_HEIGHT for n in nodes) + ROW_GAP * (len(nodes) - 1)

    by_layer = [[n for n in layer if layer[n] == k] for k in sorted(set(layer.values()))]
    budget = max(COLUMN_BUDGET, *(height(nodes) for nodes in by_layer))
    column, stacked, col = {}, [], 0
    for nodes in reversed(by_layer):
        if stacked and height(stacked + nodes) > budget:
            stacked, col = [], col + 1
        stacked += nodes
        column.update({n: col for n in nodes})
    return {n: col - c for n, c in column.items()}  # numbered left to right


def to_ui(prompt: dict, object_info: dict) -> dict:
    """A LiteGraph v0.4 workflow equivalent to the API-format `prompt`."""
    depth = depths(prompt)
    layer = layers(prompt, depth)
    order = sorted(prompt, key=lambda n: (depth[n], int(n)))  # "order": a topological one, sources first
    nodes, links, models = {}, [], []
    for rank, node_id in enumerate(order):
        entry, info = prompt[node_id], object_info[prompt[node_id]["class_type"]]
        inputs, widgets, multiline, preview = [], [], False, entry["class_type"] in IMAGE_OUTPUT_NODES
        for name, spec in input_specs(info):
            value = entry["inputs"].get(name)
            if is_widget(spec):
                options = spec[1] if len(spec) > 1 else {}
                widgets.append(options.get("default") if value is None else value)
                multiline |= bool(options.get("multiline"))
                # Widgets the front end adds after an input and serialises in widgets_values (not sent to the
                # server): the seed's "control after generate" and LoadImage's upload button.
                if options.get("control_after_generate"):
                    widgets.append("fixed")
                if options.get("image_upload"):
                    widgets.append("image")
                    preview = True
            else:
                inputs.append({"name": name, "type": spec[0], "link": None})
        outputs = [
            {"name": name, "type": kind, "links": [], "slot_index": i}
            for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))
        ]
        height = SLOT_HEIGHT * max(len(inputs), len(outputs)) + WIDGET_HEIGHT * len(widgets) + BODY_PADDING
        if multiline:
            height += MULTILINE_HEIGHT - WIDGET_HEIGHT
        if preview:
            height += IMAGE_PREVIEW_HEIGHT
        title = entry.get("_meta", {}).get("title", info.get("display_name", ""))
        width = max(WIDE_NODE_WIDTH if multiline else NODE_WIDTH, round(TITLE_CHAR_WIDTH * len(title)) + 10)
        node = {
            "id": int(node_id),
            "type": entry["class_type"],
            "pos": [0, 0],
            "size": [width, height],
            "flags": {},
            "order": rank,
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": entry["class_type"]},
            "widgets_values": widgets,
        }
        if "_meta" in entry:
            node["title"] = entry["_meta"]["title"]
        on_node, in_folder = model_files(entry["class_type"], entry["inputs"])
        if on_node:
            node["properties"]["models"] = on_node
        models += [m for m in in_folder if m not in models]
        nodes[node_id] = node
    # Place columns left to right, each as wide as its widest node; within a column, top to bottom by layer,
    # then by id (the twins number nodes in reading order). Positions are the top left of the body: the
    # title bar is drawn above it, so the first row starts one title height down.
    column = columns(layer, {n: node["size"][1] for n, node in nodes.items()})
    x = 0
    for col in sorted(set(column.values())):
        members = sorted((n for n in order if column[n] == col), key=lambda n: (layer[n], int(n)))
        y = TITLE_HEIGHT
        for node_id in members:
            nodes[node_id]["pos"] = [x, y]
            y += nodes[node_id]["size"][1] + ROW_GAP + TITLE_HEIGHT
        x += max(nodes[n]["size"][0] for n in members) + COLUMN_GAP
    for node_id in order:
        for slot, socket in enumerate(nodes[node_id]["inputs"]):
            source = prompt[node_id]["inputs"].get(socket["name"])
            if not isinstance(source, list):
                continue
            link_id = len(links) + 1
            origin, origin_slot = nodes[source[0]], source[1]
            links.append([link_id, int(source[0]), origin_slot, int(node_id), slot, socket["type"]])
            socket["link"] = link_id
            origin["outputs"][origin_slot]["links"].append(link_id)
    # No saved view ("extra.ds"): the front end then fits the whole graph into the window on open, whatever
    # its size (a fixed offset put the first column under the menu bar).
    return {
        "last_node_id": max(int(n) for n in prompt),
        "last_link_id": len(links),
        "nodes": [nodes[n] for n in order],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
        "models": models,
    }


def write_ui_workflows(object_info: dict) -> list[Path]:
    written = []
    for twin in sorted((ROOT / "workflows" / "api").glob("*.json")):
        ui = to_ui(json.loads(twin.read_text()), object_info)
        out = ROOT / "workflows" / twin.name
        out.write_text(json.dumps(ui, indent=1) + "\n")
        written.append(out)
    return written


def main() -> None:
    from blip_diffusion_nodes.tools.comfy_server import ComfyServer, prepare_base

    with tempfile.TemporaryDirectory() as tmp:
        with ComfyServer(prepare_base(Path(tmp))) as comfy:
            object_info = comfy.get_json("/object_info")
    for path in write_ui_workflows(object_info):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
