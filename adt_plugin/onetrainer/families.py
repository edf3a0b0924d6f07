"""OneTrainer's models mapped onto the model families (`adt_plugin.families`).

The model's facts (guidance mode, inference schedule, the unconditional batch, the
presets' defaults) are the family's; which family a OneTrainer model type is comes
from the family modules' `onetrainer_model_types`. What is here is only how each
OneTrainer model class hands its conditioning over and encodes the empty prompt:

  StableDiffusion(XL/3)  the denoiser call of predict() is replayed as captured
                         (`CapturedCall`), its batched arguments being the conditioning
  Flux, ZImage           predict()'s transformer call gives the conditioning (FLUX: the T5
                         states and pooled CLIP; Z-Image: the caption embeddings, padded
                         as the family keeps them); the rollout calls the same transformer
                         through the family's own call (packing, ids, time convention)

Mirrors OneTrainer master @ 23df3832e8f213d64c337e39f9365ba46e99fed0
(modules/modelSetup/Base{StableDiffusion,StableDiffusionXL,StableDiffusion3,Flux,ZImage}Setup.predict,
modules/model/*Model.encode_text, modules/modelSampler/*Sampler: the negative prompt is
encoded exactly like this).
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from ..families import FAMILIES as MODEL_FAMILIES
from ..families import FamilyError, ModelFamily, family_for
from ..families.zimage import pad_sequences
from ..presets import defaults_for

SEP = "."  # flattened nested keyword arguments: added_cond_kwargs.text_embeds


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


def _flux_empty(model, config):
    text, pooled = model.encode_text(
        train_device=model.train_device, batch_size=1, text="",
        text_encoder_1_layer_skip=config.text_encoder_layer_skip,
        text_encoder_2_layer_skip=config.text_encoder_2_layer_skip,
        text_encoder_2_sequence_length=config.text_encoder_2_sequence_length,
        apply_attention_mask=config.transformer.attention_mask,
    )
    return {"encoder_hidden_states": text, "pooled_projections": pooled}


class ModelCalls:
    """How a OneTrainer model class's predict() calls its denoiser (StableDiffusion, XL, 3):
    the captured call is replayed with the rollout's sample, timestep and conditioning."""

    #: (model, config) -> {conditioning key: empty-prompt tensor [1, ...]}
    empty_prompt: Callable[[Any, Any], dict[str, torch.Tensor]] = staticmethod(_sd_empty)
    #: re-encode the empty prompt with trained text encoders (SD3's T5 may live on the CPU: base encoders)
    live_uncond = True

    def training(self, family: ModelFamily, config: Any) -> ModelFamily:
        """The family as this run trains it (see `ModelFamily.with_training`)."""
        return family

    def cond(self, call: "CapturedCall", family: ModelFamily) -> dict[str, Optional[torch.Tensor]]:
        """The core's conditioning from predict()'s denoiser call."""
        return call.cond

    def denoise(self, model: Any, denoiser: torch.nn.Module, family: ModelFamily, call: "CapturedCall",
                sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        with model.autocast_context:
            return output_tensor(denoiser(**call.kwargs(sample, timestep, cond))).float()


class SdxlCalls(ModelCalls):
    empty_prompt = staticmethod(_sdxl_empty)


class Sd3Calls(ModelCalls):
    empty_prompt = staticmethod(_sd3_empty)
    live_uncond = False


class FamilyCalls(ModelCalls):
    """Transformers the family knows how to call (FLUX.1, Z-Image): predict()'s call gives
    the conditioning, the rollout calls the same transformer through `family.denoise`."""

    live_uncond = False  # T5 / Qwen3 are usually cached or off the training device

    def denoise(self, model, denoiser, family, call, sample, timestep, cond):
        dtype = call.dtype
        cond = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        with model.autocast_context:
            return family.denoise(denoiser, sample.to(dtype), timestep, cond).float()


class FluxCalls(FamilyCalls):
    empty_prompt = staticmethod(_flux_empty)

    def training(self, family, config):
        # BaseFluxSetup.predict feeds the transformer config.transformer.guidance_scale (dev)
        return family.with_training(train_guidance=float(getattr(config.transformer, "guidance_scale", 1.0)))

    def cond(self, call, family):
        args = call.arguments
        return {"encoder_hidden_states": args["encoder_hidden_states"], "pooled_projections": args["pooled_projections"]}


class ZImageCalls(FamilyCalls):
    @staticmethod
    def empty_prompt(model, config):
        return pad_sequences(model.encode_text(train_device=model.train_device, batch_size=1, text=""), ZIMAGE_TEXT_LENGTH)

    def cond(self, call, family):
        return pad_sequences(list(call.arguments["cap_feats"]), family.max_sequence_length)


ZIMAGE_TEXT_LENGTH = 512  # OneTrainer's PROMPT_MAX_LENGTH for Z-Image and the family's padding

#: OneTrainer's setup / saver module names (the families' `onetrainer_setup`) -> how its model class calls
CALLS: dict[str, ModelCalls] = {
    "StableDiffusion": ModelCalls(),
    "StableDiffusionXL": SdxlCalls(),
    "StableDiffusion3": Sd3Calls(),
    "Flux": FluxCalls(),
    "ZImage": ZImageCalls(),
}


@dataclass(frozen=True)
class OneTrainerModel:
    """The model families OneTrainer trains under one set of model types (SD 1.x / 2.x: sd1 and sd2;
    FLUX_DEV_1: FLUX.1-dev and schnell, told apart by the loaded transformer's guidance embedding)."""

    families: tuple[ModelFamily, ...]

    @property
    def family(self) -> ModelFamily:
        """The one its presets and defaults are for (the first: no `variant_of`)."""
        return self.families[0]

    @property
    def name(self) -> str:
        return self.family.onetrainer_setup

    @property
    def label(self) -> str:
        return " / ".join(f.label for f in self.families)

    @property
    def calls(self) -> ModelCalls:
        return CALLS[self.family.onetrainer_setup]

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for f in self.families for t in f.onetrainer_model_types))

    @property
    def denoiser(self) -> str:
        return self.family.denoiser_attr

    @property
    def live_uncond(self) -> bool:
        return self.calls.live_uncond

    @property
    def modules(self) -> tuple[str, ...]:
        """modules/modelSetup/<name>{LoRA,FineTune}Setup and modules/modelSaver/<name>{LoRA,FineTune}ModelSaver."""
        name = self.family.onetrainer_setup
        return (f"modules.modelSetup.{name}LoRASetup", f"modules.modelSetup.{name}FineTuneSetup",
                f"modules.modelSaver.{name}LoRAModelSaver", f"modules.modelSaver.{name}FineTuneModelSaver")

    def defaults(self) -> dict[str, Any]:
        """The ADT settings a config gets when ADT is turned on for these model types: the
        presets' (adt_plugin/presets/families/<family>.toml) of the first family that states
        a deployed sampler (Z_IMAGE: Z-Image-Turbo's; the base model states none)."""
        return next((d for d in map(defaults_for, self.families) if d), {})

    def loaded_family(self, model: Any) -> ModelFamily:
        """Which of the families the loaded model is (its denoiser's config decides where they differ)."""
        if len(self.families) == 1:
            return self.family
        config = dict(getattr(getattr(model, self.denoiser), "config", {}) or {})
        config.setdefault("_class_name", self.family.denoiser_class)
        return next((f for f in self.families if f.matches_config(config, None)), self.family)

    def family_for_config(self, config: Any) -> ModelFamily:
        """Before loading: the family of the config's base model where its local files say
        (keys or configs only), else the first (FLUX_DEV_1: FLUX.1-dev)."""
        if len(self.families) == 1:
            return self.family
        path = str(getattr(config, "base_model_name", "") or "")
        try:
            found = family_for(path) if path and os.path.exists(path) else None
        except FamilyError:
            found = None
        return next((f for f in self.families if found is not None and f.name == found.name), self.family)

    def empty_prompt(self, model: Any, config: Any) -> dict[str, torch.Tensor]:
        return self.calls.empty_prompt(model, config)

    def scheduler_config(self, model: Any, config: Any) -> dict[str, Any]:
        """The model's own scheduler config (read from its folder: FLUX.1-dev's states its
        resolution-dependent shift), copied so nothing touches model.noise_scheduler."""
        scheduler_config = copy.deepcopy(dict(model.noise_scheduler.config))
        if getattr(config, "rescale_noise_scheduler_to_zero_terminal_snr", False) and "FlowMatch" not in str(
            scheduler_config.get("_class_name", "")
        ):
            # OneTrainer rescales the betas in place (not in the config); say so to the rollout's schedulers
            scheduler_config.update(rescale_betas_zero_snr=True)
        return scheduler_config

    def clean_latents(self, model: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """x0 in the denoiser's latent space, as predict() scales batch['latent_image']
        ((latents - shift) * scale; SD's VAE has no shift)."""
        vae_config = model.vae.config
        shift = vae_config.get("shift_factor", None) or 0.0
        return ((batch["latent_image"] - shift) * vae_config["scaling_factor"]).float()


def _models() -> dict[str, OneTrainerModel]:
    grouped: dict[str, list[ModelFamily]] = {}
    for family in MODEL_FAMILIES.values():
        if family.onetrainer_setup in CALLS and family.onetrainer_model_types:
            grouped.setdefault(family.onetrainer_setup, []).append(family)
    return {name: OneTrainerModel(tuple(sorted(fams, key=lambda f: bool(f.variant_of)))) for name, fams in grouped.items()}


#: OneTrainer setup name -> the model (the families it trains)
FAMILIES: dict[str, OneTrainerModel] = _models()
Family = OneTrainerModel  # the name the rest of the plugin used


#: OneTrainer TrainingMethod names whose setups the plugin wraps (LoRA and full fine-tune)
TRAINING_METHODS = ("LORA", "FINE_TUNE")


def family_of(model_type: Any) -> Optional[OneTrainerModel]:
    name = getattr(model_type, "name", str(model_type))
    return next((f for f in FAMILIES.values() if name in f.model_types), None)


class CapturedCall:
    """How predict() called the denoiser, split into the sample, the timestep,
    batched conditioning (flattened: `added_cond_kwargs.text_embeds`) and the rest."""

    def __init__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        self.arguments = dict(arguments)  # as called (FamilyCalls reads the conditioning from here)
        names = list(arguments)
        # `sample` (UNet2DConditionModel) / `hidden_states` (SD3 / FLUX transformers) / `x` (Z-Image: a list)
        self.sample_key = names[0]
        sample = arguments.pop(self.sample_key)
        arguments.pop("timestep", None)
        if isinstance(sample, (list, tuple)):
            self.cond, self.constants, self.dtype = {}, {}, sample[0].dtype
            return
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


__all__ = [
    "CALLS", "CapturedCall", "FAMILIES", "Family", "ModelCalls", "OneTrainerModel", "SEP", "TRAINING_METHODS",
    "capture_denoiser_call", "family_of", "output_tensor",
]
