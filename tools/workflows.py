"""Write the UI-format workflows (workflows/*.json) from their API-format twins (workflows/api/*.json).

    python tools/workflows.py          # starts a headless ComfyUI for /object_info, rewrites workflows/*.json

The API twin is the source: tests post it as it is. The UI file (LiteGraph workflow v0.4,
what ComfyUI's template browser serves and the front end loads) is laid out in columns by
graph depth; widget values follow each node's input order from /object_info. The browser
test checks that the front end turns every UI file back into exactly its twin.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SIZE_INPUTS = {"EmptyLatentImage": ("width", "height"), "ImageScale": ("width", "height")}
COLUMN_WIDTH, NODE_WIDTH, ROW_HEIGHT, GAP = 380, 330, 26, 40


def shrink(prompt: dict, size: int = 128, steps: int = 3) -> dict:
    """The same graph at a CPU-friendly size: smaller images and fewer sampler steps."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        for key in SIZE_INPUTS.get(node["class_type"], ()):
            node["inputs"][key] = size
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
    return prompt


def is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def input_specs(info: dict) -> list[tuple[str, list]]:
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    return [(name, specs[name]) for name in order]


def depths(prompt: dict) -> dict[str, int]:
    memo: dict[str, int] = {}

    def depth(node_id: str) -> int:
        if node_id not in memo:
            links = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
            memo[node_id] = 1 + max((depth(s) for s in links), default=-1)
        return memo[node_id]

    for node_id in prompt:
        depth(node_id)
    return memo


def to_ui(prompt: dict, object_info: dict) -> dict:
    """A LiteGraph v0.4 workflow equivalent to the API-format `prompt`."""
    level = depths(prompt)
    order = sorted(prompt, key=lambda n: (level[n], int(n)))
    nodes, links = {}, []
    column_y: dict[int, float] = {}
    for rank, node_id in enumerate(order):
        entry, info = prompt[node_id], object_info[prompt[node_id]["class_type"]]
        inputs, widgets = [], []
        for name, spec in input_specs(info):
            value = entry["inputs"].get(name)
            if is_widget(spec):
                widgets.append(spec[1].get("default") if value is None else value)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
                if len(spec) > 1 and spec[1].get("image_upload"):
                    widgets.append("image")
            else:
                inputs.append({"name": name, "type": spec[0], "link": None})
        outputs = [{"name": name, "type": kind, "links": [], "slot_index": i}
                   for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
        height = 60 + ROW_HEIGHT * (len(inputs) + len(widgets) + len(outputs))
        if any(isinstance(w, str) and len(w) > 40 for w in widgets):
            height += 80  # multiline text boxes
        x, y = 40 + COLUMN_WIDTH * level[node_id], column_y.get(level[node_id], 40)
        column_y[level[node_id]] = y + height + GAP
        node = {"id": int(node_id), "type": entry["class_type"], "pos": [x, y], "size": [NODE_WIDTH, height],
                "flags": {}, "order": rank, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": entry["class_type"]}, "widgets_values": widgets}
        if "_meta" in entry:
            node["title"] = entry["_meta"]["title"]
        nodes[node_id] = node
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
    return {"last_node_id": max(int(n) for n in prompt), "last_link_id": len(links),
            "nodes": [nodes[n] for n in order], "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def write_ui_workflows(object_info: dict) -> list[Path]:
    written = []
    for twin in sorted((ROOT / "workflows" / "api").glob("*.json")):
        ui = to_ui(json.loads(twin.read_text()), object_info)
        out = ROOT / "workflows" / twin.name
        out.write_text(json.dumps(ui, indent=1) + "\n")
        written.append(out)
    return written


def main() -> None:
    from comfy_server import ComfyServer, prepare_base

    with tempfile.TemporaryDirectory() as tmp:
        with ComfyServer(prepare_base(Path(tmp))) as comfy:
            object_info = comfy.get_json("/object_info")
    for path in write_ui_workflows(object_info):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
