"""diffusers parameter names -> the original (LDM / MMDiT) names the other tools use.

ComfyUI, A1111 and sd-scripts address a model by its original checkpoint names:
the SD UNet as `input_blocks.N.M...` (LDM), SD3 as `joint_blocks.N.x_block...`
(MMDiT, with q, k and v fused into one `qkv` layer). We train the diffusers
models, so a full fine-tune saved as one file and a LoRA saved with kohya keys
need their names mapped back. `original_name` maps one diffusers module or
parameter name and says where it sits in the original tensor:

    OriginalName(name, part, parts, swap)
      part / parts   the rows [part/parts, (part+1)/parts) of a fused tensor (SD3 qkv)
      swap           the two halves (shift, scale) are stored in the other order
                     (SD3's final AdaLayerNormContinuous layers)

The inverse maps are diffusers' own single-file converters; the tests check this
module against them.

The last section names LoRA layers in files: which format each family's LoRA is
written in (`LORA_FORMATS`), sd-scripts' kohya names (`kohya_lora_name`), and the
conversion of an sd-scripts SD3 LoRA to the diffusers layout (`kohya_to_diffusers_lora`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch


class UnmappedName(KeyError):
    """A diffusers name this family has no original name for."""


@dataclass(frozen=True)
class OriginalName:
    name: str
    part: int = 0
    parts: int = 1
    swap: bool = False


# --- SD1.x / SD2.x / SDXL UNet (LDM layout) ----------------------------------------

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _inner_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    if head not in _RESNET:
        raise UnmappedName(rest)
    return _RESNET[head] + ("." + tail if tail else "")


def unet_original_name(name: str, config: Mapping[str, Any]) -> str:
    """`down_blocks.1.attentions.0.proj_in.weight` -> `input_blocks.4.1.proj_in.weight`."""
    per_down = int(config["layers_per_block"]) + 1  # LDM: a block's layers, then its downsampler
    for top, original in _UNET_TOP.items():
        if name == top or name.startswith(top + "."):
            return original + name[len(top) :]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_down + layer
        return (
            f"input_blocks.{index}.0.{_inner_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        )
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * per_down}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        kind, layer, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * layer}.{_inner_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_down + layer
        return (
            f"output_blocks.{index}.0.{_inner_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        )
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name)
    if m:
        block = int(m[1])
        has_attention = "CrossAttn" in config["up_block_types"][block]
        return f"output_blocks.{block * per_down + per_down - 1}.{2 if has_attention else 1}.{m[2]}"
    raise UnmappedName(name)


# --- SD3 MMDiT ---------------------------------------------------------------------

_SD3_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "pos_embed.pos_embed": "pos_embed",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}
# inside transformer_blocks.N: diffusers module -> (stream, original module, qkv part)
_SD3_BLOCK = {
    "attn.to_q": ("x_block", "attn.qkv", 0),
    "attn.to_k": ("x_block", "attn.qkv", 1),
    "attn.to_v": ("x_block", "attn.qkv", 2),
    "attn.to_out.0": ("x_block", "attn.proj", None),
    "attn.norm_q": ("x_block", "attn.ln_q", None),
    "attn.norm_k": ("x_block", "attn.ln_k", None),
    "attn.add_q_proj": ("context_block", "attn.qkv", 0),
    "attn.add_k_proj": ("context_block", "attn.qkv", 1),
    "attn.add_v_proj": ("context_block", "attn.qkv", 2),
    "attn.to_add_out": ("context_block", "attn.proj", None),
    "attn.norm_added_q": ("context_block", "attn.ln_q", None),
    "attn.norm_added_k": ("context_block", "attn.ln_k", None),
    "attn2.to_q": ("x_block", "attn2.qkv", 0),
    "attn2.to_k": ("x_block", "attn2.qkv", 1),
    "attn2.to_v": ("x_block", "attn2.qkv", 2),
    "attn2.to_out.0": ("x_block", "attn2.proj", None),
    "attn2.norm_q": ("x_block", "attn2.ln_q", None),
    "attn2.norm_k": ("x_block", "attn2.ln_k", None),
    "ff.net.0.proj": ("x_block", "mlp.fc1", None),
    "ff.net.2": ("x_block", "mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block", "mlp.fc1", None),
    "ff_context.net.2": ("context_block", "mlp.fc2", None),
    "norm1.linear": ("x_block", "adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block", "adaLN_modulation.1", None),
}


def sd3_original_name(name: str, config: Mapping[str, Any]) -> OriginalName:
    module, _, leaf = name.rpartition(".") if name.endswith((".weight", ".bias")) else (name, "", "")
    suffix = f".{leaf}" if leaf else ""
    if module == "norm_out.linear":
        return OriginalName("final_layer.adaLN_modulation.1" + suffix, swap=True)
    if module in _SD3_TOP:
        return OriginalName(_SD3_TOP[module] + suffix)
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m and m[2] in _SD3_BLOCK:
        block = int(m[1])
        stream, original, part = _SD3_BLOCK[m[2]]
        last = block == int(config["num_layers"]) - 1
        # The last block's context stream only feeds the next layer norm: diffusers
        # stores its AdaLayerNormContinuous halves in the other order.
        swap = last and m[2] == "norm1_context.linear"
        full = f"joint_blocks.{block}.{stream}.{original}{suffix}"
        return OriginalName(full, part or 0, 1 if part is None else 3, swap)
    raise UnmappedName(name)


# --- per family --------------------------------------------------------------------


def original_name(family: str, name: str, config: Mapping[str, Any]) -> OriginalName:
    """The original name of a diffusers denoiser module or parameter."""
    if family == "sd3":
        return sd3_original_name(name, config)
    if family in ("sd1", "sd2", "sdxl"):
        return OriginalName(unet_original_name(name, config))
    raise ValueError(f"unknown family {family!r}")


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original_state_dict(
    family: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers denoiser state dict in original names (fused tensors re-assembled)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, value in state.items():
        target = original_name(family, key, config)
        value = swap_halves(value) if target.swap else value
        if target.parts == 1:
            out[target.name] = value
        else:
            fused.setdefault(target.name, [None] * target.parts)[target.part] = value
    for name, pieces in fused.items():
        if any(p is None for p in pieces):
            raise UnmappedName(f"{name}: only some of its {len(pieces)} fused parts are present")
        out[name] = torch.cat(pieces, dim=0)
    return out


# --- LoRA files ----------------------------------------------------------------------
#
# Two layouts, per LoRA layer (a diffusers module `m` of the denoiser):
#
#   kohya      lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha
#              (scale alpha / rank). What sd-scripts writes and ComfyUI, A1111 and
#              diffusers' SD1/SD2/SDXL loaders read. <name> is sd-scripts' module
#              name with dots as underscores: the diffusers name for SD1/SD2 (it
#              trains a UNet with diffusers names), the LDM name for SDXL, the MMDiT
#              name for SD3 (q, k and v fused into one `qkv` layer).
#   diffusers  transformer.<m>.lora_A.weight / .lora_B.weight (peft's names), no
#              alpha: alpha / rank is folded into lora_B, so every reader applies
#              scale 1. diffusers' SD3 loader reads only this layout (it has no
#              converter for sd-scripts' SD3 names and would load nothing);
#              ComfyUI reads it too (comfy/lora.py: "transformer." + the diffusers
#              name, mapped onto slices of the fused qkv). sd-scripts cannot read it.
#
# No one layout is read by all three tools for SD3, so `adt train` writes SD3
# LoRAs in the diffusers layout and `adt eval` converts sd-scripts' SD3 files
# (`kohya_to_diffusers_lora`) before handing them to diffusers.


@dataclass(frozen=True)
class LoraFormat:
    name: str
    down: str  # suffix of the [rank, in] factor
    up: str  # suffix of the [out, rank] factor
    writes_alpha: bool  # False: alpha / rank is folded into `up`


KOHYA = LoraFormat("kohya", ".lora_down.weight", ".lora_up.weight", True)
DIFFUSERS = LoraFormat("diffusers", ".lora_A.weight", ".lora_B.weight", False)
LORA_FORMATS = {"sd1": KOHYA, "sd2": KOHYA, "sdxl": KOHYA, "sd3": DIFFUSERS}  # what `adt train` writes
KOHYA_UNET_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = {"sd1": "unet.", "sd2": "unet.", "sdxl": "unet.", "sd3": "transformer."}


def kohya_lora_name(family: str, module: str, config: Mapping[str, Any]) -> OriginalName:
    """sd-scripts' name of a denoiser module's LoRA layer, and where the module sits in it
    (SD3's q, k, v: parts 0, 1, 2 of the fused `qkv` layer)."""
    if family in ("sd1", "sd2"):
        return OriginalName(KOHYA_UNET_PREFIX + module.replace(".", "_"))
    target = original_name(family, module, config)
    return OriginalName(KOHYA_UNET_PREFIX + target.name.replace(".", "_"), target.part, target.parts, target.swap)


def lora_layer_name(family: str, module: str, config: Mapping[str, Any], fmt: LoraFormat) -> OriginalName:
    """The layer name (without the factor suffix) a LoRA file of format `fmt` uses."""
    if fmt is DIFFUSERS:
        return OriginalName(DIFFUSERS_PREFIX[family] + module)
    return kohya_lora_name(family, module, config)


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def kohya_to_diffusers_lora(
    state: Mapping[str, torch.Tensor],
    transformer: torch.nn.Module,
    text_encoders: Mapping[tuple[str, str], Optional[torch.nn.Module]],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An sd-scripts SD3 LoRA (kohya names) in the diffusers layout, and the kohya layers
    that name no module of these models (left out of the result).

    `text_encoders`: {(sd-scripts prefix, diffusers prefix): encoder or None}, e.g.
    ("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2."). A fused qkv
    layer (rank R, up [3 x out, R]) becomes three layers of rank R that share the down
    factor, each with its third of the up rows: exactly the same update."""
    targets: dict[str, list[tuple[str, OriginalName]]] = {}
    for module in _linear_names(transformer):
        try:
            target = kohya_lora_name("sd3", module, transformer.config)
        except UnmappedName:
            continue
        targets.setdefault(target.name, []).append(("transformer." + module, target))
    for (kohya_prefix, diffusers_prefix), encoder in text_encoders.items():
        if encoder is None:
            continue
        for module in _linear_names(encoder):
            # sd-scripts names CLIP modules from `text_model.` (transformers 5 may lack that level)
            name = module if module.startswith("text_model.") else "text_model." + module
            targets.setdefault(kohya_prefix + name.replace(".", "_"), []).append((diffusers_prefix + module, OriginalName(name)))
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for layer in sorted({k.rsplit(".lora_down.weight", 1)[0] for k in state if k.endswith(".lora_down.weight")}):
        if layer not in targets:
            unmatched.append(layer)
            continue
        down, up = state[f"{layer}.lora_down.weight"].float(), state[f"{layer}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = state.get(f"{layer}.alpha")
        scale = (float(alpha) if alpha is not None else rank) / rank
        pieces = up.chunk(targets[layer][0][1].parts, dim=0)
        for diffusers_name, target in targets[layer]:
            piece = pieces[target.part] * scale
            out[f"{diffusers_name}.lora_A.weight"] = down.contiguous()
            out[f"{diffusers_name}.lora_B.weight"] = (swap_halves(piece) if target.swap else piece).contiguous()
    return out, unmatched
