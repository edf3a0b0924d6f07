"""What differs between OneTrainer's SD1.x/2.x, SDXL and SD3 models.

Mirrors OneTrainer master @ 23df3832e8f213d64c337e39f9365ba46e99fed0
(modules/modelSetup/BaseStableDiffusion*Setup.predict, modules/model/*Model.encode_text,
modules/modelSampler/*Sampler: the negative prompt is encoded exactly like this).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

SEP = "."  # flattened nested keyword arguments: added_cond_kwargs.text_embeds


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    model_types: tuple[str, ...]  # OneTrainer ModelType names
    denoiser: str  # attribute of the model called in predict()
    #: (model, config) -> {captured keyword: empty-prompt tensor [1, ...]}
    empty_prompt: Callable[[Any, Any], dict[str, torch.Tensor]]
    #: re-encode the empty prompt with trained text encoders (SD3's T5 may live on the CPU: base encoders)
    live_uncond: bool = True
    #: OneTrainer's modules that register this family's LoRA / fine-tune setups and savers
    modules: tuple[str, ...] = ()

    def scheduler_config(self, model: Any, config: Any) -> dict[str, Any]:
        """The model's own scheduler config, copied so nothing touches model.noise_scheduler."""
        scheduler_config = copy.deepcopy(dict(model.noise_scheduler.config))
        if getattr(config, "rescale_noise_scheduler_to_zero_terminal_snr", False) and "FlowMatch" not in str(
            scheduler_config.get("_class_name", "")
        ):
            # OneTrainer rescales the betas in place (not in the config); say so to the rollout's schedulers
            scheduler_config.update(rescale_betas_zero_snr=True)
        return scheduler_config

    def clean_latents(self, model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """x0 in the denoiser's latent space, as predict() scales batch['latent_image']."""
        vae_config = model.vae.config
        shift = vae_config.get("shift_factor", None) if self.name == "sd3" else None
        latents = batch["latent_image"]
        if shift is not None:
            latents = latents - shift
        return (latents * vae_config["scaling_factor"]).float()


def _sd_empty(model, config):
    return {"encoder_hidden_states": model.encode_text(
        train_device=model.train_device, text="", text_encoder_layer_skip=config.text_encoder_layer_skip)}


def _sdxl_empty(model, config):
    embedding, pooled = model.combine_text_encoder_output(*model.encode_text(
        train_device=model.train_device, text="",
        text_encoder_1_layer_skip=config.text_encoder_layer_skip,
        text_encoder_2_layer_skip=config.text_encoder_2_layer_skip,
    ))
    return {"encoder_hidden_states": embedding, f"added_cond_kwargs{SEP}text_embeds": pooled}


def _sd3_empty(model, config):
    embedding, pooled = model.combine_text_encoder_output(*model.encode_text(
        train_device=model.train_device, text="",
        text_encoder_1_layer_skip=config.text_encoder_layer_skip,
        text_encoder_2_layer_skip=config.text_encoder_2_layer_skip,
        text_encoder_3_layer_skip=config.text_encoder_3_layer_skip,
        apply_attention_mask=config.transformer.attention_mask,
    ))
    return {"encoder_hidden_states": embedding, "pooled_projections": pooled}


def _registering(name: str) -> tuple[str, ...]:
    """modules/modelSetup/<name>{LoRA,FineTune}Setup and modules/modelSaver/<name>{LoRA,FineTune}ModelSaver."""
    return (f"modules.modelSetup.{name}LoRASetup", f"modules.modelSetup.{name}FineTuneSetup",
            f"modules.modelSaver.{name}LoRAModelSaver", f"modules.modelSaver.{name}FineTuneModelSaver")


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd", "SD 1.x / 2.x",
               ("STABLE_DIFFUSION_15", "STABLE_DIFFUSION_20", "STABLE_DIFFUSION_20_BASE", "STABLE_DIFFUSION_21",
                "STABLE_DIFFUSION_21_BASE"),
               "unet", _sd_empty, modules=_registering("StableDiffusion")),
        Family("sdxl", "SDXL", ("STABLE_DIFFUSION_XL_10_BASE",), "unet", _sdxl_empty,
               modules=_registering("StableDiffusionXL")),
        Family("sd3", "SD3", ("STABLE_DIFFUSION_3", "STABLE_DIFFUSION_35"), "transformer", _sd3_empty, live_uncond=False,
               modules=_registering("StableDiffusion3")),
    )
}


#: OneTrainer TrainingMethod names whose setups the plugin wraps (LoRA and full fine-tune)
TRAINING_METHODS = ("LORA", "FINE_TUNE")


def family_of(model_type: Any) -> Optional[Family]:
    name = getattr(model_type, "name", str(model_type))
    return next((f for f in FAMILIES.values() if name in f.model_types), None)


class CapturedCall:
    """How predict() called the denoiser, split into the sample, the timestep,
    batched conditioning (flattened: `added_cond_kwargs.text_embeds`) and the rest."""

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        names = list(arguments)
        self.sample_key = names[0]  # `sample` (UNet2DConditionModel) / `hidden_states` (SD3Transformer2DModel)
        sample = arguments.pop(self.sample_key)
        arguments.pop("timestep", None)
        batch = sample.shape[0]
        self.cond: dict[str, torch.Tensor] = {}
        self.constants: dict[str, Any] = {}
        for key, value in arguments.items():
            if isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
                for sub, tensor in value.items():
                    self.cond[f"{key}{SEP}{sub}"] = tensor
            elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                self.cond[key] = value
            else:
                self.constants[key] = value
        self.dtype = sample.dtype

    def kwargs(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, Optional[torch.Tensor]]) -> dict:
        kwargs: dict[str, Any] = {self.sample_key: sample.to(self.dtype), "timestep": timestep, **self.constants}
        for key, value in cond.items():
            if SEP in key:
                outer, inner = key.split(SEP, 1)
                kwargs.setdefault(outer, {})[inner] = value
            else:
                kwargs[key] = value
        return kwargs


class _Captured(Exception):
    def __init__(self, call: CapturedCall):
        super().__init__("denoiser call captured")
        self.call = call


def capture_denoiser_call(module: torch.nn.Module, run: Callable[[], Any]) -> CapturedCall:
    """Run `run()` (OneTrainer's predict) up to its denoiser call and return that call's
    arguments; the denoiser itself does not run."""

    def hook(mod, args, kwargs):
        raise _Captured(CapturedCall(mod, args, kwargs))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Captured as captured:
        return captured.call
    finally:
        handle.remove()
    raise RuntimeError(f"ADT: predict() never called the model's {type(module).__name__}; this OneTrainer version is not supported")


def output_tensor(out: Any) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out


__all__ = ["CapturedCall", "FAMILIES", "Family", "SEP", "TRAINING_METHODS", "capture_denoiser_call", "family_of", "output_tensor"]
