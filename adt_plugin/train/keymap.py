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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

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
