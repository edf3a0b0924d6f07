"""A user's LoRA file into a diffusers pipeline, refusing what would silently not apply.

diffusers' `load_lora_weights` leaves out keys it has no place for without an
error: an SD3 LoRA with sd-scripts' names loads nothing at all, and a LoRA made
for another model can load in part. An evaluation of such a model would be an
evaluation of the base model under the LoRA's name. So every LoRA layer in the
file must become a LoRA layer of the pipeline; otherwise loading stops with the
file's name and the counts.

sd-scripts' SD3 layout (which diffusers cannot read) and its FLUX layout (which
diffusers' converter reads only at FLUX.1's real widths) are converted first
(`keymap.kohya_to_diffusers_lora`; `family.lora.diffusers_reads_kohya`); SD1 /
SD2 / SDXL kohya files go to diffusers' own kohya converter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..families import ModelFamily

# the "down" factor of one LoRA layer in the layouts diffusers reads
DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight", "_lora.down.weight")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
TOO_FEW = "use it with the model it was trained for (a LoRA for another model or architecture changes nothing or only part of it)"


class LoraFileError(ValueError):
    """A LoRA file that cannot be read, or whose layers do not (all) fit the model."""


@dataclass(frozen=True)
class LoadedLora:
    path: Path
    layers: int  # LoRA layers in the file (all of them loaded)


def lora_layers(keys) -> set[str]:
    """The names of the LoRA layers among a file's keys (one per "down" factor)."""
    out = set()
    for key in keys:
        for suffix in DOWN_SUFFIXES:
            if key.endswith(suffix):
                out.add(key[: -len(suffix)])
                break
    return out


def check_lora_file(path: str | Path) -> int:
    """Read the file's header only (before any model loads): the number of LoRA layers
    it holds, or LoraFileError naming the file and what to do."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"LoRA file {path}: only .safetensors LoRA files are read (no pickled .pt / .ckpt / .bin)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise LoraFileError(f"LoRA file {path} cannot be read ({_first_line(err)}): it is not a complete .safetensors file; save or download it again") from err
    layers = lora_layers(keys)
    if not layers:
        raise LoraFileError(
            f"LoRA file {path} holds no LoRA layers (no keys ending in {' or '.join(DOWN_SUFFIXES[:2])}): is it a LoRA?"
        )
    return len(layers)


def read_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    check_lora_file(path)
    try:
        return load_file(str(Path(path).expanduser()))
    except Exception as err:  # noqa: BLE001 - a file cut off after its header
        raise LoraFileError(f"LoRA file {path} cannot be read ({_first_line(err)}): save or download it again") from err


def load_lora(pipe, family: ModelFamily, path: str | Path, adapter_name: str) -> LoadedLora:
    """Load `path` into `pipe` as `adapter_name`; every layer of the file must load."""
    path = Path(path).expanduser()
    state = read_lora_file(path)
    layers = len(lora_layers(state))
    if not family.lora.diffusers_reads_kohya and any(k.startswith(KOHYA_PREFIXES) for k in state):
        from ..train.keymap import kohya_to_diffusers_lora

        # sd-scripts' text-encoder prefixes -> diffusers' (diffusers' SD3 and FLUX pipelines load no T5 LoRA)
        encoders = {(prefix, f"{attr}."): getattr(pipe, attr, None) for prefix, attr in family.lora.text_encoders}
        denoiser = getattr(pipe, family.denoiser_attr)
        state, unmatched = kohya_to_diffusers_lora(state, denoiser, encoders, family)
        if unmatched:
            raise LoraFileError(
                f"LoRA file {path}: {len(unmatched)} of its {layers} layers name no layer of this {family.label} model "
                f"(e.g. {', '.join(unmatched[:3])}); {TOO_FEW}"
                + (f"; diffusers' {family.label} pipelines load no T5 (lora_te3_) LoRA layers" if any(u.startswith("lora_te3_") for u in unmatched) else "")
            )
    expected = len(lora_layers(state))  # after the conversion: a fused qkv layer is three
    try:
        pipe.load_lora_weights(state, adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError) as err:  # diffusers: unknown keys, size mismatches
        raise LoraFileError(f"LoRA file {path} does not fit this {family.name} model ({_first_line(err)}); {TOO_FEW}") from err
    loaded = adapter_layer_count(pipe, adapter_name)
    if loaded != expected:
        raise LoraFileError(f"LoRA file {path}: {loaded} of its {expected} layers loaded into this {family.name} model; {TOO_FEW}")
    return LoadedLora(path, layers)


def adapter_layer_count(pipe, adapter_name: str) -> int:
    """How many layers of the pipeline's models carry the adapter `adapter_name`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for attr in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        model = getattr(pipe, attr, None)
        if isinstance(model, torch.nn.Module):
            count += sum(
                1 for m in model.modules() if isinstance(m, BaseTunerLayer) and adapter_name in getattr(m, "lora_A", {})
            )
    return count


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
