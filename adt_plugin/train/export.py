"""Saving a full fine-tune: a diffusers folder or one safetensors file.

format = "diffusers"    the whole pipeline as a folder (the trained denoiser,
                        the other components as loaded); diffusers, ComfyUI's
                        diffusers loader, sd-scripts and OneTrainer read it.
format = "safetensors"  one file in the original checkpoint layout: the
                        denoiser under `model.diffusion_model.` with original
                        (LDM / MMDiT / BFL FLUX) names; a family without a
                        known original layout (Z-Image) saves diffusers folders
                        only (checked before the model loads). When the run started from a
                        single-file checkpoint, every other tensor of that
                        file (VAE, text encoders) is copied through, so the
                        result is a complete checkpoint for A1111 and
                        ComfyUI's checkpoint loader; from a diffusers folder
                        it holds the denoiser only (ComfyUI: Load Diffusion Model).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..families import ModelFamily
from ..fileio import atomic_save_safetensors
from .keymap import to_original_state_dict
from .state import replace_dir

DENOISER_PREFIX = "model.diffusion_model."


def save_single_file(
    path: Path,
    family: ModelFamily,
    denoiser: torch.nn.Module,
    dtype: torch.dtype,
    source_file: Optional[Path] = None,
    metadata: Optional[Mapping[str, str]] = None,
) -> Path:
    state = {k: v.detach().to(dtype) for k, v in denoiser.state_dict().items()}
    tensors = {DENOISER_PREFIX + k: v for k, v in to_original_state_dict(family, state, denoiser.config).items()}
    if source_file is not None:
        from safetensors import safe_open

        with safe_open(str(source_file), framework="pt") as handle:
            for key in handle.keys():
                if not key.startswith(DENOISER_PREFIX):
                    tensors[key] = handle.get_tensor(key)
    atomic_save_safetensors(tensors, path, metadata)
    return path


def save_diffusers_folder(folder: Path, pipe, denoiser_attr: str, dtype: torch.dtype) -> Path:
    """The pipeline with its trained denoiser (cast to `dtype` on the way out, the
    training copy untouched), written beside and then moved into place."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    pipe.save_config(str(tmp))  # model_index.json, as DiffusionPipeline.save_pretrained writes it
    for name, component in pipe.components.items():
        if component is None:
            continue
        if name == denoiser_attr:
            (tmp / name).mkdir()
            component.save_config(str(tmp / name))
            state = {k: v.detach().to(dtype) for k, v in component.state_dict().items()}
            atomic_save_safetensors(state, tmp / name / "diffusion_pytorch_model.safetensors")
        elif hasattr(component, "save_pretrained"):
            component.save_pretrained(str(tmp / name))
    replace_dir(tmp, folder)
    return folder
