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

from .config import ModelConfig

PIPELINES = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
}
# The repository whose configs and tokenizers a single file of each family needs.
CONFIG_REPOS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
}


class ModelLoadError(ValueError):
    """The model cannot be loaded; says what is missing and how to get it."""


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(path))


def family_of_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    class_name = json.loads(index.read_text()).get("_class_name", "")
    if class_name not in PIPELINES:
        raise ModelLoadError(
            f"{folder} holds a {class_name or 'unknown'} pipeline; adt train supports {', '.join(PIPELINES)}"
        )
    family = PIPELINES[class_name]
    if family == "sd1":
        te = folder / "text_encoder" / "config.json"
        if te.is_file() and json.loads(te.read_text()).get("hidden_size") == 1024:  # OpenCLIP-H: SD 2.x
            family = "sd2"
    return family


def family_of_file(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise ModelLoadError(f"{path} cannot be read as a safetensors checkpoint ({err})") from err
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
        return "sd3"
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP text encoder
        return "sd2"
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "sd1"
    raise ModelLoadError(f"{path}: not an SD1.x / SD2.x / SDXL / SD3 checkpoint (no known denoiser keys)")


def detect_family(config: ModelConfig) -> str:
    path = _expand(config.path)
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist (a diffusers folder or a .safetensors file)")
    found = family_of_folder(path) if path.is_dir() else family_of_file(path)
    wanted = config.family
    if wanted != "auto" and wanted != found and {wanted, found} != {"sd1", "sd2"}:
        raise ModelLoadError(f"[model] family = {wanted!r}, but {path} is a {found} model")
    return found if wanted == "auto" else wanted


def config_folder_for(config: ModelConfig, family: str) -> Path:
    """The local folder with the diffusers configs a single file of `family` needs."""
    if config.config_dir:
        folder = _expand(config.config_dir)
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(
                f"[model] config_dir {folder} has no model_index.json: it must be a diffusers folder of the "
                f"same model (its configs and tokenizers; the weights are not needed)"
            )
        return folder
    repo = CONFIG_REPOS[family]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the cache (or no hub library): say what to do
        raise ModelLoadError(
            f"{config.path} is a single-file {family} checkpoint; building its pipeline needs the diffusers configs "
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


def load_pipeline(config: ModelConfig, family: str, dtype: torch.dtype = torch.float32):
    """The diffusers pipeline (on the CPU, in `dtype`), from local files only."""
    import diffusers

    from .models import FAMILIES

    path = _expand(config.path)
    cls = getattr(diffusers, FAMILIES[family].pipeline_class)
    if path.is_dir():
        # SD3 runs without its T5 encoder (the pipeline then uses zeros); a folder may leave it out.
        absent = {
            name: None for name in ("text_encoder_3", "tokenizer_3") if family == "sd3" and not (path / name).is_dir()
        }
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
