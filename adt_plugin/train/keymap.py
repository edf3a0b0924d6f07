"""diffusers parameter names -> the original (LDM / MMDiT) names the other tools use.

ComfyUI, A1111 and sd-scripts address a model by its original checkpoint names:
the SD UNet as `input_blocks.N.M...` (LDM), SD3 as `joint_blocks.N.x_block...`
(MMDiT, with q, k and v fused into one `qkv` layer), FLUX.1 as
`double_blocks.N.img_attn.qkv` / `single_blocks.N.linear1` (BFL's layout: q, k, v
fused, and in the single blocks the MLP's input projection fused after them). We
train the diffusers models, so a full fine-tune saved as one file and a LoRA saved
with kohya keys need their names mapped back. Which layout a model uses is its
family's fact (`family.lora.original`: "ldm_unet", "mmdit", "flux"); `original_name`
maps one diffusers module or parameter name and says where it sits in the original
tensor:

    OriginalName(name, part, parts, swap)
      part / parts   the part-th of `parts` row blocks of a fused tensor, in order
                     (the blocks' sizes are the diffusers layers' own: FLUX's fused
                     linear1 is q, k, v of width d and the MLP's 4d)
      swap           the two halves (shift, scale) are stored in the other order
                     (the final AdaLayerNormContinuous layers of SD3 and FLUX)

The inverse maps are diffusers' own single-file converters (and ComfyUI's
`flux_to_diffusers`); the tests check this module against them.

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


# --- FLUX.1 (BFL layout) -----------------------------------------------------------

_FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
# inside transformer_blocks.N (double_blocks.N): diffusers module -> (original module, qkv part)
_FLUX_DOUBLE = {
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.norm_q": ("img_attn.norm.query_norm", None),
    "attn.norm_k": ("img_attn.norm.key_norm", None),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_add_out": ("txt_attn.proj", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
    "attn.norm_added_k": ("txt_attn.norm.key_norm", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
# inside single_transformer_blocks.N (single_blocks.N): linear1 = [q; k; v; mlp in]
_FLUX_SINGLE = {
    "norm.linear": ("modulation.lin", None, 1),
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", None, 1),
    "attn.norm_q": ("norm.query_norm", None, 1),
    "attn.norm_k": ("norm.key_norm", None, 1),
}


def flux_original_name(name: str, config: Mapping[str, Any]) -> OriginalName:
    """`single_transformer_blocks.0.proj_mlp.weight` -> `single_blocks.0.linear1.weight`, part 3 of 4."""
    module, _, leaf = name.rpartition(".") if name.endswith((".weight", ".bias")) else (name, "", "")
    # the q / k RMSNorms: diffusers' `weight` is BFL's `scale`
    norm = module.rsplit(".", 1)[-1] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    suffix = f".{'scale' if norm and leaf == 'weight' else leaf}" if leaf else ""
    if module == "norm_out.linear":
        return OriginalName("final_layer.adaLN_modulation.1" + suffix, swap=True)
    if module in _FLUX_TOP:
        return OriginalName(_FLUX_TOP[module] + suffix)
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m and m[2] in _FLUX_DOUBLE:
        original, part = _FLUX_DOUBLE[m[2]]
        return OriginalName(f"double_blocks.{m[1]}.{original}{suffix}", part or 0, 1 if part is None else 3)
    m = re.match(r"single_transformer_blocks\.(\d+)\.(.+)", module)
    if m and m[2] in _FLUX_SINGLE:
        original, part, parts = _FLUX_SINGLE[m[2]]
        return OriginalName(f"single_blocks.{m[1]}.{original}{suffix}", part or 0, parts)
    raise UnmappedName(name)


# --- per layout --------------------------------------------------------------------

#: the original layouts a family's `lora.original` names
LAYOUTS = {
    "ldm_unet": lambda name, config: OriginalName(unet_original_name(name, config)),
    "mmdit": sd3_original_name,
    "flux": flux_original_name,
}


def layout_of(family: Any) -> str:
    """The original layout of `family` (a ModelFamily or its name), or UnmappedName."""
    from ..families import get_family

    layout = get_family(family).lora.original
    if layout not in LAYOUTS:
        raise UnmappedName(f"no original (single-file) layout is known for {get_family(family).label}")
    return layout


def original_name(family: Any, name: str, config: Mapping[str, Any]) -> OriginalName:
    """The original name of a diffusers denoiser module or parameter of `family`
    (a ModelFamily or its name)."""
    return LAYOUTS[layout_of(family)](name, config)


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original_state_dict(
    family: Any, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A diffusers denoiser state dict in original names (fused tensors re-assembled)."""
    layout = LAYOUTS[layout_of(family)]
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[torch.Tensor | None]] = {}
    for key, value in state.items():
        target = layout(key, config)
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
#              trains a UNet with diffusers names), the original name otherwise
#              (LDM for SDXL; MMDiT for SD3 and BFL's for FLUX, with fused layers as
#              one: SD3's and FLUX's qkv, FLUX's single-block linear1).
#   diffusers  transformer.<m>.lora_A.weight / .lora_B.weight (peft's names), no
#              alpha: alpha / rank is folded into lora_B, so every reader applies
#              scale 1. diffusers' SD3 loader reads only this layout (it has no
#              converter for sd-scripts' SD3 names and would load nothing);
#              ComfyUI reads it too (comfy/lora.py: "transformer." + the diffusers
#              name, mapped onto slices of the fused qkv). sd-scripts cannot read it.
#
# Which one `adt train` writes is the family's fact (`family.lora.file_format`): SD3
# and Z-Image in the diffusers layout, the others in kohya's. `adt eval` converts
# kohya files diffusers cannot read at every size (`kohya_to_diffusers_lora`: SD3's,
# and FLUX's, whose diffusers converter assumes FLUX.1's real widths).


@dataclass(frozen=True)
class LoraFormat:
    name: str
    down: str  # suffix of the [rank, in] factor
    up: str  # suffix of the [out, rank] factor
    writes_alpha: bool  # False: alpha / rank is folded into `up`


KOHYA = LoraFormat("kohya", ".lora_down.weight", ".lora_up.weight", True)
DIFFUSERS = LoraFormat("diffusers", ".lora_A.weight", ".lora_B.weight", False)
KOHYA_UNET_PREFIX = "lora_unet_"


def lora_format(family: Any) -> LoraFormat:
    """The layout `adt train` writes `family`'s LoRA files in."""
    from ..families import get_family

    return KOHYA if get_family(family).lora.file_format == "kohya" else DIFFUSERS


def kohya_lora_name(family: Any, module: str, config: Mapping[str, Any]) -> OriginalName:
    """sd-scripts' name of a denoiser module's LoRA layer, and where the module sits in it
    (SD3's and FLUX's q, k, v, FLUX's single-block MLP: parts of one fused layer)."""
    from ..families import get_family

    if get_family(family).lora.kohya_names == "diffusers":
        return OriginalName(KOHYA_UNET_PREFIX + module.replace(".", "_"))
    target = original_name(family, module, config)
    return OriginalName(KOHYA_UNET_PREFIX + target.name.replace(".", "_"), target.part, target.parts, target.swap)


def lora_layer_name(family: Any, module: str, config: Mapping[str, Any], fmt: LoraFormat) -> OriginalName:
    """The layer name (without the factor suffix) a LoRA file of format `fmt` uses."""
    from ..families import get_family

    if fmt is DIFFUSERS:
        return OriginalName(f"{get_family(family).denoiser_attr}.{module}")
    return kohya_lora_name(family, module, config)


def _linear_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, layer) of every linear / conv layer; a layer peft wrapped under its own name."""
    return [
        (n.removesuffix(".base_layer"), m)
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".lora_" not in n
    ]


def _out_features(module: torch.nn.Module) -> int:
    return module.out_features if isinstance(module, torch.nn.Linear) else module.out_channels


def kohya_to_diffusers_lora(
    state: Mapping[str, torch.Tensor],
    transformer: torch.nn.Module,
    text_encoders: Mapping[tuple[str, str], Optional[torch.nn.Module]],
    family: Any = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An sd-scripts LoRA (kohya names: SD3's MMDiT or FLUX's BFL layout) in the
    diffusers layout, and the kohya layers that name no module of these models (left
    out of the result). `family`: the transformer's (default: found from its config).

    `text_encoders`: {(sd-scripts prefix, diffusers prefix): encoder or None}, e.g.
    ("lora_te1_", "text_encoder."), ("lora_te2_", "text_encoder_2."). A fused layer
    (rank R, up [sum of the parts' widths, R]) becomes one layer of rank R per part
    that share the down factor, each with its rows of up: exactly the same update."""
    from ..families import family_for, get_family

    family = get_family(family) if family is not None else family_for(transformer.config)
    targets: dict[str, list[tuple[str, OriginalName, int]]] = {}
    for module, layer in _linear_modules(transformer):
        try:
            target = kohya_lora_name(family, module, transformer.config)
        except UnmappedName:
            continue
        targets.setdefault(target.name, []).append((f"{get_family(family).denoiser_attr}.{module}", target, _out_features(layer)))
    for (kohya_prefix, diffusers_prefix), encoder in text_encoders.items():
        if encoder is None:
            continue
        for module, layer in _linear_modules(encoder):
            # sd-scripts names CLIP modules from `text_model.` (transformers 5 may lack that level)
            name = module if module.startswith("text_model.") else "text_model." + module
            targets.setdefault(kohya_prefix + name.replace(".", "_"), []).append(
                (diffusers_prefix + module, OriginalName(name), _out_features(layer))
            )
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
        parts = sorted(targets[layer], key=lambda t: t[1].part)
        pieces = up.split([width for _, _, width in parts], dim=0) if len(parts) > 1 else (up,)
        for (diffusers_name, target, _), piece in zip(parts, pieces):
            piece = piece * scale
            out[f"{diffusers_name}.lora_A.weight"] = down.contiguous()
            out[f"{diffusers_name}.lora_B.weight"] = (swap_halves(piece) if target.swap else piece).contiguous()
    return out, unmatched
