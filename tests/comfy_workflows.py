"""Turning a UI-format ComfyUI workflow into the API format, as the frontend does.

UI format (what `example_workflows/*.json` and "Save" hold): nodes with positions,
socket inputs pointing at link ids, and `widgets_values` in the order of the node's
widget inputs (a seed with "control after generate" is followed by its mode).
API format (what POST /prompt takes): {id: {class_type, inputs}} with links as
[source id, output slot]. Which inputs are widgets comes either from our node
specs (tests without ComfyUI) or from a running server's /object_info.
"""

from __future__ import annotations

from typing import Callable, Mapping

WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# The core nodes the example workflow uses (nodes.py at ComfyUI a125cd84): widget names in order.
CORE_WIDGETS: dict[str, list[tuple[str, bool]]] = {
    "CheckpointLoaderSimple": [("ckpt_name", False)],
    "SaveImage": [("filename_prefix", False)],
    "PreviewImage": [],
    "PreviewAny": [],
}

WidgetList = Callable[[str], list[tuple[str, bool]]]  # node type -> [(widget name, has control-after-generate)]


def spec_widgets(node_type: str) -> list[tuple[str, bool]]:
    from comfyui_nodes.nodes import NODE_SPECS

    for spec in NODE_SPECS:
        if spec.node_id == node_type:
            return [(i.name, i.control_after_generate) for i in spec.inputs if i.kind in WIDGET_KINDS]
    return CORE_WIDGETS[node_type]


def object_info_widgets(object_info: Mapping) -> WidgetList:
    """Widget order from a server's /object_info (required, then optional)."""

    def widgets(node_type: str) -> list[tuple[str, bool]]:
        info = object_info[node_type]
        order = info.get("input_order") or {k: list(v) for k, v in info["input"].items() if k != "hidden"}
        out = []
        for section in ("required", "optional"):
            for name in order.get(section, []):
                kind, *rest = info["input"][section][name]
                options = rest[0] if rest else {}
                if isinstance(kind, list) or kind in WIDGET_KINDS:
                    out.append((name, bool(options.get("control_after_generate"))))
        return out

    return widgets


def ui_to_api(workflow: Mapping, widgets: WidgetList) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:  # muted / bypassed nodes are not sent
            continue
        inputs: dict = {}
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, source, slot, *_ = links[socket["link"]]
                inputs[socket["name"]] = [str(source), slot]
        values = list(node.get("widgets_values", []))
        for name, control in widgets(node["type"]):
            value = values.pop(0)  # a widget turned into a connected socket keeps its (unused) value
            if control:
                values.pop(0)  # "fixed" / "randomize" / ...
            inputs.setdefault(name, value)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over: {values}")
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api
