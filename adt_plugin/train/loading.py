"""Load a model from a local diffusers folder or a local single-file checkpoint.

Nothing is downloaded. A single-file checkpoint holds weights only; diffusers
builds the pipeline around it from the model's diffusers configs and tokenizer
files, which it would otherwise fetch from the Hub. We give it a local folder
instead: `model.config_dir`, or the model's repository in the local Hugging Face
cache. Without either, the error says which repository to fetch once and how.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from ..families import ModelFamily
from .config import ModelConfig


class ModelLoadError(ValueError):
    """The model cannot be loaded; says what is missing and how to get it."""


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(path))


def detect_family(config: ModelConfig) -> ModelFamily:
    """The model's family (families.family_for on the folder or file), or the one
    `[model] family` names if it has the same weights layout (sd1 / sd2, zimage /
    zimage_turbo). Reads configs and keys only."""
    from ..families import FamilyError, family_for, get_family, interchangeable

    path = _expand(config.path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (a diffusers folder or a .safetensors file)")
    try:
        found = family_for(path)
    except FamilyError as err:
        raise ModelLoadError(f"[model] path: {err}") from None
    if config.family == "auto":
        return found
    wanted = get_family(config.family)
    if not interchangeable(found.name, wanted.name):
        raise ModelLoadError(f"[model] family = {config.family!r}, but {path} is a {found.name} model ({found.label})")
    return wanted


def check_single_file(config: ModelConfig, family: ModelFamily) -> None:
    """A single-file checkpoint of a family whose pipeline diffusers cannot build from
    one file (FLUX.1's and Z-Image's files hold the transformer alone), before loading."""
    path = _expand(config.path)
    if path.is_file() and not family.config_repo:
        raise ModelLoadError(
            f"{path} is a single-file {family.label} checkpoint; adt train loads {family.label} from a diffusers "
            f"folder (the transformer, VAE, text encoders and tokenizers): point [model] path at one"
        )


def config_folder_for(config: ModelConfig, family: ModelFamily) -> Path:
    """The local folder with the diffusers configs a single file of `family` needs."""
    if config.config_dir:
        folder = _expand(config.config_dir)
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"[model] config_dir {folder} has no model_index.json: it must be a diffusers folder of the "
                f"same model (its configs and tokenizers; the weights are not needed)"
            )
        return folder
    check_single_file(config, family)
    repo = family.config_repo
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or no hub library): say what to do
        raise ModelLoadError(
            f"{config.path} is a single-file {family.name} checkpoint; building its pipeline needs the diffusers configs "
            f"and tokenizers of {repo}, and nothing is downloaded at run time. On a machine with internet run "
            f"`hf download {repo} --exclude '*.safetensors' '*.bin' '*.ckpt' '*.pt' '*.onnx*' "
            f"'*.msgpack' --local-dir ./{repo.split('/')[-1]}-configs` and set [model] config_dir to that folder "
            f"(or convert the checkpoint to a diffusers folder and point [model] path at it)."
        ) from None


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """diffusers renamed `torch_dtype` to `dtype` (and warns about the old name); older
    releases, such as the one sd-scripts pins, know only `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    new = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def load_pipeline(config: ModelConfig, family: ModelFamily, dtype: torch.dtype = torch.float32):
    """The diffusers pipeline (on the CPU, in `dtype`), from local files only."""
    import diffusers

    path = _expand(config.path)
    cls = getattr(diffusers, family.pipeline_class)
    if path.is_dir():
        # components the family runs without (SD3's T5: the pipeline then uses zeros)
        absent = {name: None for name in family.optional_components if not (path / name).is_dir()}
        if "safety_checker" in json.loads((path / "model_index.json").read_text()):
            # never needed here: loading it costs a 1.2 GB CLIP and it would black out samples
            absent.update(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(str(path), local_files_only=True, **absent, **dtype_kwargs(dtype))
    else:
        folder = config_folder_for(config, family)
        pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **dtype_kwargs(dtype))
    if config.vae_path:
        pipe.vae = load_vae(
            _expand(config.vae_path), path if path.is_dir() else config_folder_for(config, family), dtype
        )
    if config.prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=config.prediction_type)
    return pipe


def load_vae(path: Path, model_folder: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    if not path.exists():
        raise ModelLoadError(f"[model] vae_path {path} does not exist")
    if path.is_dir():
        return AutoencoderKL.from_pretrained(str(path), local_files_only=True, **dtype_kwargs(dtype))
    return AutoencoderKL.from_single_file(
        str(path), config=str(model_folder), subfolder="vae", local_files_only=True, **dtype_kwargs(dtype)
    )


def set_attention(pipe, denoiser, choice: str) -> str:
    """'xformers' or 'sdpa': what the denoiser and VAE will use."""
    if choice in ("auto", "xformers"):
        try:
            import xformers  # noqa: F401

            pipe.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as err:  # noqa: BLE001 - not installed or not usable on this device
            if choice == "xformers":
                raise ModelLoadError(
                    f"[model] attention = 'xformers' but xformers is not usable here ({err}); "
                    f"`pip install xformers` matching your torch, or set attention = 'sdpa'"
                ) from err
    return "sdpa"


def resolve_dtype(name: str, default: Optional[torch.dtype] = None) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(name, default or torch.float32)
