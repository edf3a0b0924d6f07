"""LoRA through peft, saved in the kohya format that ComfyUI, A1111 and sd-scripts load.

Training uses peft adapters on the diffusers denoiser (scale = alpha / rank). A
saved file holds, per adapted layer,

    <kohya name>.lora_down.weight   peft's lora_A      [rank, in] (conv: [rank, in, kh, kw])
    <kohya name>.lora_up.weight     peft's lora_B      [out, rank] (conv: [out, rank, 1, 1])
    <kohya name>.alpha              alpha (a scalar)

with the names sd-scripts writes for the family (checked against ComfyUI's
comfy/lora.py key map and diffusers' kohya converters):

    sd1, sd2   lora_unet_ + the diffusers module name, dots -> underscores
               (sd-scripts trains SD1/2 on a UNet with diffusers names)
    sdxl       lora_unet_ + the LDM name (input_blocks_4_1_transformer_blocks_0_attn1_to_q)
    flux_*     lora_unet_ + BFL's name, as sd-scripts' networks/lora_flux.py writes it
               (double_blocks_0_img_attn_qkv, single_blocks_0_linear1, ...)

A fused original layer (FLUX's and SD3's q, k, v; FLUX's single-block linear1 =
q, k, v and the MLP's input) trained as n diffusers layers of rank r is written as
one layer of rank n r: the downs stacked, up block-diagonal (each part's rows hold
its own up), alpha x n so that alpha / rank is unchanged (a loader divides alpha
by the fused rank). The update is exactly the sum of the parts'.

SD3 and Z-Image LoRAs are written in diffusers' layout instead (`transformer.<module>.lora_A /
lora_B`, alpha / rank folded into lora_B): for SD3 the only one both diffusers and
ComfyUI read (see keymap.py). `fmt=KOHYA` writes sd-scripts' SD3 layout. Which
layout is the family's fact (`family.lora.file_format`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..fileio import atomic_save_safetensors
from .config import LoraConfig
from ..families import ModelFamily
from .keymap import LoraFormat, UnmappedName, lora_format, lora_layer_name, swap_halves


class LoraSetupError(ValueError):
    """A LoRA target that matches nothing, or that no kohya name exists for."""


def add_lora(denoiser: torch.nn.Module, family: ModelFamily, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, add a peft LoRA adapter, return the trainable parameters.
    The family's default targets leave out what its `lora.exclude` names (FLUX's final
    layer); targets the user lists are taken as they are."""
    from peft import LoraConfig as PeftLoraConfig

    targets = list(config.target_modules or family.lora.targets)
    names = [n for n, _ in denoiser.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise LoraSetupError(
            f"[lora] target_modules {unmatched} match no layer of this {family.name} denoiser; "
            f"the default for the family is {list(family.lora.targets)}"
        )
    exclude = None if config.target_modules else (family.lora.exclude or None)
    denoiser.requires_grad_(False)
    denoiser.add_adapter(
        PeftLoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            exclude_modules=exclude,
            init_lora_weights=True,
        )
    )
    fmt = lora_format(family)
    for module in lora_modules(denoiser):  # fail now, not at the first save
        try:
            lora_layer_name(family, module, denoiser.config, fmt)
        except UnmappedName:
            raise LoraSetupError(
                f"[lora] layer {module} has no name in the {fmt.name} LoRA format for {family.name}; "
                f"leave it out of target_modules"
            ) from None
    return [p for p in denoiser.parameters() if p.requires_grad]


def peft_state(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(denoiser).items()}


def load_peft_state(denoiser: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(denoiser, dict(state))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA state does not fit this model: unexpected {unexpected[:5]}")


def lora_modules(denoiser: torch.nn.Module) -> list[str]:
    return sorted({k.rsplit(".lora_A.", 1)[0] for k in peft_state(denoiser) if ".lora_A." in k})


def to_kohya(
    family: ModelFamily,
    denoiser: torch.nn.Module,
    alpha: float,
    dtype: torch.dtype = torch.float16,
    fmt: Optional[LoraFormat] = None,
) -> dict[str, torch.Tensor]:
    """The LoRA file's tensors in `fmt` (default: the family's layout, `family.lora.file_format`)."""
    fmt = fmt or lora_format(family)
    state = peft_state(denoiser)
    groups: dict[str, list[Optional[tuple[torch.Tensor, torch.Tensor]]]] = {}
    for module in lora_modules(denoiser):
        down, up = state[f"{module}.lora_A.weight"].float(), state[f"{module}.lora_B.weight"].float()
        target = lora_layer_name(family, module, denoiser.config, fmt)
        parts = groups.setdefault(target.name, [None] * target.parts)
        parts[target.part] = (down, swap_halves(up) if target.swap else up)
    widths = _part_widths(family, denoiser, fmt, groups) if any(len(p) > 1 for p in groups.values()) else {}
    out: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        if len(parts) == 1:
            down, up = parts[0]
        else:  # a fused layer: rank n r, block-diagonal up; absent parts stay zero
            some = next(p for p in parts if p is not None)
            rank = some[0].shape[0]
            rows = widths[name]
            downs, up = [], torch.zeros(sum(rows), rank * len(parts), *some[1].shape[2:])
            for i, piece in enumerate(parts):
                downs.append(piece[0] if piece else torch.zeros_like(some[0]))
                if piece:
                    up[sum(rows[:i]) : sum(rows[: i + 1]), i * rank : (i + 1) * rank] = piece[1]
            down = torch.cat(downs, dim=0)
        if fmt.writes_alpha:
            out[f"{name}.alpha"] = torch.tensor(float(alpha) * len(parts))
        else:
            up = up * (float(alpha) / down.shape[0])
        out[name + fmt.down] = down.to(dtype).contiguous()
        out[name + fmt.up] = up.to(dtype).contiguous()
    return out


def _part_widths(family, denoiser, fmt, groups) -> dict[str, list[int]]:
    """The rows each part of a fused layer holds (its diffusers layer's output width),
    read from the denoiser: a part the LoRA does not train still has its rows."""
    widths: dict[str, list[int]] = {name: [0] * len(parts) for name, parts in groups.items() if len(parts) > 1}
    for module, layer in denoiser.named_modules():
        if not isinstance(layer, torch.nn.Linear) or ".lora_" in module:
            continue
        module = module.removesuffix(".base_layer")  # a layer peft wrapped
        try:
            target = lora_layer_name(family, module, denoiser.config, fmt)
        except UnmappedName:
            continue
        if target.name in widths:
            widths[target.name][target.part] = layer.out_features
    return widths


def lora_metadata(
    family: ModelFamily, lora: LoraConfig, prediction_type: str, extra: Optional[Mapping[str, Any]] = None
) -> dict[str, str]:
    """sd-scripts' `ss_*` keys and the Stability AI model spec, as kohya tools read them."""
    spec = family.model_spec(prediction_type)
    meta = {
        "ss_network_module": family.lora.network_module,
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(lora.alpha),
        "ss_network_dropout": str(lora.dropout),
        "ss_base_model_version": spec["ss_base_model_version"],
        "ss_v2": spec["ss_v2"],
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec['modelspec.architecture']}/lora",
        "modelspec.implementation": spec["modelspec.implementation"],
        "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction_type, prediction_type),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_lora(
    path: Path,
    family: ModelFamily,
    denoiser: torch.nn.Module,
    lora: LoraConfig,
    metadata: Mapping[str, str],
    dtype: torch.dtype,
) -> Path:
    atomic_save_safetensors(to_kohya(family, denoiser, lora.alpha, dtype), path, metadata)
    return path
