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

SD3 LoRAs are written in diffusers' layout instead (`transformer.<module>.lora_A /
lora_B`, alpha / rank folded into lora_B): the only one both diffusers and ComfyUI
read (see keymap.py). `fmt=KOHYA` writes sd-scripts' SD3 layout (lora_unet_ + the
MMDiT name, q, k and v fused into one layer of rank 3r, up block-diagonal, alpha x 3
so that alpha / rank is unchanged: a loader divides alpha by the fused rank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..fileio import atomic_save_safetensors
from .config import LoraConfig
from .keymap import LORA_FORMATS, LoraFormat, UnmappedName, lora_layer_name, swap_halves
from .models import Family

class LoraSetupError(ValueError):
    """A LoRA target that matches nothing, or that no kohya name exists for."""


def add_lora(denoiser: torch.nn.Module, family: Family, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, add a peft LoRA adapter, return the trainable parameters."""
    from peft import LoraConfig as PeftLoraConfig

    targets = list(config.target_modules or family.lora_targets)
    names = [n for n, _ in denoiser.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise LoraSetupError(
            f"[lora] target_modules {unmatched} match no layer of this {family.name} denoiser; "
            f"the default for the family is {list(family.lora_targets)}"
        )
    denoiser.requires_grad_(False)
    denoiser.add_adapter(
        PeftLoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=targets,
            init_lora_weights=True,
        )
    )
    fmt = LORA_FORMATS[family.name]
    for module in lora_modules(denoiser):  # fail now, not at the first save
        try:
            lora_layer_name(family.name, module, denoiser.config, fmt)
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
    family: Family,
    denoiser: torch.nn.Module,
    alpha: float,
    dtype: torch.dtype = torch.float16,
    fmt: Optional[LoraFormat] = None,
) -> dict[str, torch.Tensor]:
    """The LoRA file's tensors in `fmt` (default: the family's format, LORA_FORMATS)."""
    fmt = fmt or LORA_FORMATS[family.name]
    state = peft_state(denoiser)
    groups: dict[str, dict[str, Any]] = {}
    for module in lora_modules(denoiser):
        down, up = state[f"{module}.lora_A.weight"].float(), state[f"{module}.lora_B.weight"].float()
        target = lora_layer_name(family.name, module, denoiser.config, fmt)
        group = groups.setdefault(target.name, {"parts": [None] * target.parts})
        group["parts"][target.part] = (down, swap_halves(up) if target.swap else up)
    out: dict[str, torch.Tensor] = {}
    for name, group in groups.items():
        parts = group["parts"]
        if len(parts) == 1:
            down, up = parts[0]
        else:  # a fused layer (SD3 qkv): rank 3r, block-diagonal up; absent parts stay zero
            shape = next(p for p in parts if p is not None)
            rank, out_dim = shape[0].shape[0], shape[1].shape[0]
            downs, up = [], torch.zeros(out_dim * len(parts), rank * len(parts), *shape[1].shape[2:])
            for i, piece in enumerate(parts):
                downs.append(piece[0] if piece else torch.zeros_like(shape[0]))
                if piece:
                    up[i * out_dim : (i + 1) * out_dim, i * rank : (i + 1) * rank] = piece[1]
            down = torch.cat(downs, dim=0)
        if fmt.writes_alpha:
            out[f"{name}.alpha"] = torch.tensor(float(alpha) * len(parts))
        else:
            up = up * (float(alpha) / down.shape[0])
        out[name + fmt.down] = down.to(dtype).contiguous()
        out[name + fmt.up] = up.to(dtype).contiguous()
    return out


def lora_metadata(
    family: Family, lora: LoraConfig, prediction_type: str, extra: Optional[Mapping[str, Any]] = None
) -> dict[str, str]:
    """sd-scripts' `ss_*` keys and the Stability AI model spec, as kohya tools read them."""
    version = family.base_model_version
    architecture = family.architecture
    if family.name == "sd2" and prediction_type == "v_prediction":
        version, architecture = "sd_v2_v", "stable-diffusion-v2-768-v"
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(lora.alpha),
        "ss_network_dropout": str(lora.dropout),
        "ss_base_model_version": version,
        "ss_v2": str(family.name == "sd2"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": family.implementation,
        "modelspec.prediction_type": {"v_prediction": "v"}.get(prediction_type, prediction_type),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_lora(
    path: Path,
    family: Family,
    denoiser: torch.nn.Module,
    lora: LoraConfig,
    metadata: Mapping[str, str],
    dtype: torch.dtype,
) -> Path:
    atomic_save_safetensors(to_kohya(family, denoiser, lora.alpha, dtype), path, metadata)
    return path
