"""One description of each node, built into a V3 (`comfy_api.latest.io`) class or,
on ComfyUI versions without the V3 API, a V1 class with the same inputs, outputs
and behaviour. No ComfyUI import happens here until a builder runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

CATEGORY = "ADT/compare"


@dataclass(frozen=True)
class In:
    name: str
    kind: str  # MODEL CLIP VAE IMAGE INT FLOAT STRING BOOLEAN COMBO or a custom type name
    default: Any = None
    tooltip: Optional[str] = None
    optional: bool = False
    options: Optional[Callable[[], list[str]]] = None  # COMBO: called each time ComfyUI asks
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    multiline: bool = False
    control_after_generate: bool = False


@dataclass(frozen=True)
class Out:
    name: str
    kind: str
    tooltip: Optional[str] = None


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: Sequence[In]
    outputs: Sequence[Out]
    run: Callable[..., tuple]  # run(hidden=Hidden, **inputs) -> outputs
    validate: Optional[Callable] = None  # classmethod body: validate(cls, <widget inputs>) -> True | str
    # classmethod body: fingerprint(cls, **<widget inputs>) -> a value that changes when a file
    # the node reads changed (V1 IS_CHANGED, V3 fingerprint_inputs); ComfyUI reruns the node then
    fingerprint: Optional[Callable] = None
    category: str = CATEGORY


@dataclass(frozen=True)
class Hidden:
    prompt: Optional[dict] = None  # the API-format prompt being run
    unique_id: Optional[str] = None  # this node's id in it


def _number_options(i: In) -> dict:
    out = {"default": i.default}
    for key in ("min", "max", "step"):
        if getattr(i, key) is not None:
            out[key] = getattr(i, key)
    return out


def v1_input(i: In) -> tuple:
    opts: dict[str, Any] = {"tooltip": i.tooltip} if i.tooltip else {}
    if i.kind == "COMBO":
        choices = i.options()
        if i.default is not None and i.default in choices:
            opts["default"] = i.default
        return (choices, opts)
    if i.kind in ("INT", "FLOAT"):
        opts.update(_number_options(i))
        if i.control_after_generate:
            opts["control_after_generate"] = True
    elif i.kind == "STRING":
        opts.update({"default": i.default or "", "multiline": i.multiline})
    elif i.kind == "BOOLEAN":
        opts["default"] = bool(i.default)
    return (i.kind, opts)


def build_v1(spec: NodeSpec) -> type:
    """A V1 node class: INPUT_TYPES / RETURN_TYPES / FUNCTION."""

    def input_types(cls):
        required = {i.name: v1_input(i) for i in spec.inputs if not i.optional}
        optional = {i.name: v1_input(i) for i in spec.inputs if i.optional}
        return {"required": required, "optional": optional, "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}}

    def run(self, prompt=None, unique_id=None, **inputs):
        return spec.run(hidden=Hidden(prompt, unique_id), **inputs)

    attrs = {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(o.kind for o in spec.outputs),
        "RETURN_NAMES": tuple(o.name for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip or "" for o in spec.outputs),
        "FUNCTION": "run",
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "run": run,
    }
    if spec.validate is not None:
        attrs["VALIDATE_INPUTS"] = classmethod(spec.validate)
    if spec.fingerprint is not None:
        attrs["IS_CHANGED"] = classmethod(spec.fingerprint)
    return type(spec.node_id, (), attrs)


def build_v3(spec: NodeSpec, io) -> type:
    """A V3 node class on `comfy_api.latest.io`."""
    custom: dict[str, Any] = {}

    def io_type(kind: str):
        simple = {"MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae, "IMAGE": io.Image, "INT": io.Int, "FLOAT": io.Float,
                  "STRING": io.String, "BOOLEAN": io.Boolean, "COMBO": io.Combo}
        if kind in simple:
            return simple[kind]
        if kind not in custom:
            custom[kind] = io.Custom(kind)
        return custom[kind]

    def v3_input(i: In):
        common = {"optional": i.optional, "tooltip": i.tooltip}
        if i.kind == "COMBO":
            choices = i.options()
            return io.Combo.Input(i.name, options=choices, default=i.default if i.default in choices else None, **common)
        if i.kind in ("INT", "FLOAT"):
            extra = {"control_after_generate": True} if i.control_after_generate else {}
            return io_type(i.kind).Input(i.name, default=i.default, min=i.min, max=i.max, step=i.step, **extra, **common)
        if i.kind == "STRING":
            return io.String.Input(i.name, default=i.default or "", multiline=i.multiline, **common)
        if i.kind == "BOOLEAN":
            return io.Boolean.Input(i.name, default=bool(i.default), **common)
        return io_type(i.kind).Input(i.name, **common)

    input_names = {i.name for i in spec.inputs}

    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=spec.category,
            description=spec.description,
            inputs=[v3_input(i) for i in spec.inputs],
            # V3 ids must differ between inputs and outputs (a metric node passes `comparison` through)
            outputs=[
                io_type(o.kind).Output(o.name + ("_out" if o.name in input_names else ""), display_name=o.name, tooltip=o.tooltip)
                for o in spec.outputs
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    def execute(cls, **inputs):
        hidden = cls.hidden
        return io.NodeOutput(*spec.run(hidden=Hidden(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None)), **inputs))

    attrs = {"define_schema": classmethod(define_schema), "execute": classmethod(execute)}
    if spec.validate is not None:
        attrs["validate_inputs"] = classmethod(spec.validate)
    if spec.fingerprint is not None:
        attrs["fingerprint_inputs"] = classmethod(spec.fingerprint)
    return type(spec.node_id, (io.ComfyNode,), attrs)
