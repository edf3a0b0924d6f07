"""sd-scripts' trainers mapped onto the model families (`adt_plugin.families`).

The model's facts (guidance mode, inference schedule, the unconditional batch, the
presets' defaults, the scheduler config of the released model) are the family's.
What is here is only how each sd-scripts trainer class hands its conditioning over
and calls its own models:

  NetworkTrainer       SD1.x/2.x: `call_unet` with [hidden states]
  SdxlNetworkTrainer   SDXL: `call_unet` with [hidden1, hidden2, pool2] and the batch's
                       size keys
  Sd3NetworkTrainer    SD3: MMDiT(x, t, context=..., y=...) as its get_noise_pred_and_target
  FluxNetworkTrainer   FLUX.1: Flux(img=packed, img_ids, txt, txt_ids, y, timesteps / 1000,
                       guidance, txt_attention_mask) as its get_noise_pred_and_target (the
                       family's packing = sd-scripts' pack_latents / prepare_img_ids); the
                       AE decodes

and which of the trainer's options the family's training-time calls follow (FLUX:
`--guidance_scale` is the guidance its diffusion loss feeds the transformer,
`--timestep_sampling` / `--discrete_flow_shift` / `--sigmoid_scale` /
`--weighting_scheme` how it draws timesteps: ADT's diffusion term does the same; the
rollout keeps the family's inference schedule).

Mirrors sd-scripts main @ 48d368fa557731ad0488c07304dfeba8c07910eb
(train_network.py, sdxl_train_network.py, sd3_train_network.py, flux_train_network.py,
library/strategy_sd*.py, library/strategy_flux.py, library/flux_train_utils.py,
library/flux_utils.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from ..families import FAMILIES as MODEL_FAMILIES
from ..families import FamilyError, ModelFamily, family_for, interchangeable
from ..families.base import TrainTimesteps, embedded_guidance
from ..families.flux import image_ids as flux_image_ids
from ..families.flux import pack_latents, unpack_latents
from ..presets import defaults_for


@dataclass
class KohyaContext:
    """The sd-scripts objects one training step runs with."""

    trainer: Any
    args: Any
    accelerator: Any
    unet: Any
    weight_dtype: torch.dtype
    vae: Any = None
    vae_dtype: Optional[torch.dtype] = None
    text_encoders: list = field(default_factory=list)
    tokenize_strategy: Any = None
    text_encoding_strategy: Any = None
    train_text_encoder: bool = False

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


# -- how each sd-scripts trainer class calls its models -------------------------------------------
class NetworkTrainerCalls:
    """train_network.py's NetworkTrainer (SD1.x / 2.x)."""

    #: batch keys the trainer's call_unet reads besides the text conditioning
    batch_keys: tuple[str, ...] = ()
    #: re-encode the empty prompt with the live text encoders when they are trained
    live_uncond = True

    def scheduler_config(self, family: ModelFamily, trainer: Any, args: Any) -> dict[str, Any]:
        """sd-scripts' own DDPM betas, with the prediction type and zero-SNR flag of this
        run, spaced as the SD/SDXL diffusers pipelines space inference steps."""
        config = dict(trainer.get_noise_scheduler(args, torch.device("cpu")).config)
        config.update(
            prediction_type="v_prediction" if getattr(args, "v_parameterization", False) else "epsilon",
            steps_offset=1,
            set_alpha_to_one=False,
            clip_sample=False,
        )
        if getattr(args, "zero_terminal_snr", False):
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return config

    def training(self, family: ModelFamily, args: Any) -> ModelFamily:
        """The family as this run trains it (see `ModelFamily.with_training`)."""
        return family

    def ignored_options(self, args: Any) -> list[str]:
        """`name=value` of this trainer's own loss options that ADT's terms do not follow."""
        return []

    def pack_cond(self, ctx: KohyaContext, text_conds: list, batch: Mapping[str, Any]) -> dict[str, Optional[torch.Tensor]]:
        cond: dict[str, Optional[torch.Tensor]] = {
            f"text_{i}": None if t is None else t.to(ctx.device) for i, t in enumerate(text_conds)
        }
        for key in self.batch_keys:
            cond[key] = batch[key].to(ctx.device)
        return cond

    def text_part(self, cond: Mapping[str, Any]) -> list:
        return [cond[f"text_{i}"] for i in range(sum(k.startswith("text_") for k in cond))]

    def encode_prompt(self, ctx: KohyaContext, text_encoders: list, prompt: str = "") -> list:
        """sd-scripts' text conditioning of one prompt, with the given text encoders."""
        tokens = ctx.tokenize_strategy.tokenize(prompt)
        models = ctx.trainer.get_models_for_text_encoding(ctx.args, ctx.accelerator, text_encoders)
        with ctx.accelerator.autocast():
            return ctx.text_encoding_strategy.encode_tokens(ctx.tokenize_strategy, models, tokens)

    def denoise(self, ctx: KohyaContext, family: ModelFamily, sample: torch.Tensor, timestep: torch.Tensor,
                cond: Mapping[str, Any]) -> torch.Tensor:
        text_conds = self.text_part(cond)
        sample = _checkpointing_inputs(ctx, sample.to(ctx.weight_dtype), text_conds)
        batch = {key: cond[key] for key in self.batch_keys}
        with ctx.accelerator.autocast():
            out = ctx.trainer.call_unet(ctx.args, ctx.accelerator, ctx.unet, sample, timestep, text_conds, batch, ctx.weight_dtype)
        return out.float()

    def decode(self, ctx: KohyaContext, latents: torch.Tensor) -> torch.Tensor:
        vae = ctx.vae
        dtype = ctx.vae_dtype or next(vae.parameters()).dtype
        return vae.decode((latents / ctx.trainer.vae_scale_factor).to(dtype)).sample.float()


class SdxlNetworkTrainerCalls(NetworkTrainerCalls):
    """sdxl_train_network.py's SdxlNetworkTrainer: call_unet also reads the size keys."""

    batch_keys = ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw")


class Sd3NetworkTrainerCalls(NetworkTrainerCalls):
    """sd3_train_network.py's Sd3NetworkTrainer: the MMDiT is called directly."""

    live_uncond = False  # T5 may be cached/offloaded: the empty prompt of the base text encoders is used

    def scheduler_config(self, family, trainer, args):
        return dict(family.scheduler_config)

    def pack_cond(self, ctx, text_conds, batch):
        # as Sd3NetworkTrainer.get_noise_pred_and_target: [lg_out, t5_out, lg_pooled, masks...] -> context, y
        lg_out, t5_out, lg_pooled = text_conds[:3]
        context, pooled = ctx.text_encoding_strategy.concat_encodings(lg_out, t5_out, lg_pooled)
        return {"context": context.to(ctx.device), "pooled": pooled.to(ctx.device)}

    def text_part(self, cond):
        return [cond["context"], cond["pooled"]]

    def encode_prompt(self, ctx, text_encoders, prompt=""):
        args = ctx.args
        tokens = ctx.tokenize_strategy.tokenize(prompt)
        with ctx.accelerator.autocast():
            return ctx.text_encoding_strategy.encode_tokens(
                ctx.tokenize_strategy, text_encoders, tokens, args.apply_lg_attn_mask, args.apply_t5_attn_mask, enable_dropout=False
            )

    def denoise(self, ctx, family, sample, timestep, cond):
        context, pooled = cond["context"], cond["pooled"]
        sample = _checkpointing_inputs(ctx, sample.to(ctx.weight_dtype), [context, pooled])
        with ctx.accelerator.autocast():
            out = ctx.unet(sample, timestep.float(), context=context, y=pooled)
        return out.float()

    def decode(self, ctx, latents):
        vae = ctx.vae
        dtype = ctx.vae_dtype or next(vae.parameters()).dtype
        return vae.decode(type(vae).process_out(latents).to(dtype)).float()


#: FLUX text conditioning as sd-scripts' FluxTextEncodingStrategy returns (and caches) it
FLUX_TEXT_KEYS = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")


class FluxNetworkTrainerCalls(NetworkTrainerCalls):
    """flux_train_network.py's FluxNetworkTrainer: Flux(img=packed latents, ...) called as its
    get_noise_pred_and_target calls it; the AE (sd-scripts' flux_models.AutoEncoder) scales
    and shifts inside encode / decode, so latents are the transformer's own."""

    live_uncond = False  # T5 is usually cached / on the CPU

    def scheduler_config(self, family, trainer, args):
        return dict(family.scheduler_config)

    def training(self, family, args):
        """sd-scripts' FLUX loss feeds the transformer `--guidance_scale` (dev; schnell has
        no guidance input) and draws its timesteps by `--timestep_sampling`
        (flux_train_utils.get_noisy_model_input_and_timesteps): ADT's diffusion term does
        the same. "sigma" picks from a FlowMatchEulerDiscreteScheduler's 1000 shifted
        timesteps; drawn here continuously from the same shifted density."""
        sampling = getattr(args, "timestep_sampling", "sigma")
        scale = float(getattr(args, "sigmoid_scale", 1.0) or 1.0)
        flow_shift = float(getattr(args, "discrete_flow_shift", 3.0) or 3.0)
        if sampling == "uniform":
            timesteps = TrainTimesteps("uniform", shift=1.0)
        elif sampling == "sigmoid":
            timesteps = TrainTimesteps("logit_normal", logit_std=scale, shift=1.0)
        elif sampling == "shift":
            timesteps = TrainTimesteps("logit_normal", logit_std=scale, shift=flow_shift)
        elif sampling == "flux_shift":  # exp(mu) of the latent's token count, as the family's schedule
            timesteps = TrainTimesteps("logit_normal", logit_std=scale, shift=None)
        else:  # "sigma": compute_density_for_timestep_sampling, then the scheduler's shifted timesteps
            scheme = getattr(args, "weighting_scheme", "uniform")
            if scheme == "logit_normal":
                timesteps = TrainTimesteps("logit_normal", float(getattr(args, "logit_mean", 0.0) or 0.0),
                                           float(getattr(args, "logit_std", 1.0) or 1.0), shift=flow_shift)
            else:  # uniform (and "mode", refused in check_args)
                timesteps = TrainTimesteps("uniform", shift=flow_shift)
        return family.with_training(train_guidance=float(getattr(args, "guidance_scale", 3.5)), timesteps=timesteps)

    def ignored_options(self, args):
        ignored = []
        if getattr(args, "model_prediction_type", "raw") != "raw":  # sigma_scaled (its default) compares x0 estimates
            ignored.append(f"model_prediction_type={args.model_prediction_type} (ADT's terms use the velocity, as raw)")
        scheme = getattr(args, "weighting_scheme", "uniform")
        if scheme not in ("uniform", "none", "logit_normal") or (scheme == "logit_normal" and getattr(args, "timestep_sampling", "sigma") != "sigma"):
            ignored.append(f"weighting_scheme={scheme}")
        return ignored

    def pack_cond(self, ctx, text_conds, batch):
        return {key: None if t is None else t.to(ctx.device) for key, t in zip(FLUX_TEXT_KEYS, text_conds)}

    def text_part(self, cond):
        return [cond[key] for key in FLUX_TEXT_KEYS]

    def encode_prompt(self, ctx, text_encoders, prompt=""):
        tokens = ctx.tokenize_strategy.tokenize(prompt)
        with ctx.accelerator.autocast():
            return ctx.text_encoding_strategy.encode_tokens(ctx.tokenize_strategy, text_encoders, tokens,
                                                            ctx.args.apply_t5_attn_mask)

    def denoise(self, ctx, family, sample, timestep, cond):
        b, _, h, w = sample.shape
        guidance = embedded_guidance(family, cond, b, sample.device)
        l_pooled, t5_out, txt_ids, t5_attn_mask = (cond[key] for key in FLUX_TEXT_KEYS)
        # the family's 2x2 packing and (0, row, col) ids: the layout of sd-scripts' flux_utils.pack_latents /
        # prepare_img_ids (batched here, as sd-scripts' Flux concatenates text and image ids per sample)
        img_ids = flux_image_ids(h, w, sample.device, torch.float32)[None].expand(b, -1, -1)
        sample = _checkpointing_inputs(ctx, sample.to(ctx.weight_dtype), [l_pooled, t5_out])
        with ctx.accelerator.autocast():
            out = ctx.unet(
                img=pack_latents(sample),
                img_ids=img_ids,
                txt=t5_out,
                txt_ids=txt_ids,
                y=l_pooled,
                timesteps=timestep.float() / 1000,  # the model scales by 1000 itself
                guidance=guidance,
                txt_attention_mask=t5_attn_mask if ctx.args.apply_t5_attn_mask else None,
            )
        return unpack_latents(out, h, w).float()

    def decode(self, ctx, latents):
        vae = ctx.vae
        dtype = ctx.vae_dtype or next(vae.parameters()).dtype
        return vae.decode(latents.to(dtype)).float()


#: sd-scripts trainer class (families' `kohya_trainer_class`) -> how it calls its models
CALLS: dict[str, NetworkTrainerCalls] = {
    "NetworkTrainer": NetworkTrainerCalls(),
    "SdxlNetworkTrainer": SdxlNetworkTrainerCalls(),
    "Sd3NetworkTrainer": Sd3NetworkTrainerCalls(),
    "FluxNetworkTrainer": FluxNetworkTrainerCalls(),
}


@dataclass(frozen=True)
class KohyaModel:
    """One model family in one sd-scripts trainer."""

    family: ModelFamily

    @property
    def calls(self) -> NetworkTrainerCalls:
        return CALLS[self.family.kohya_trainer_class]

    @property
    def label(self) -> str:
        return self.family.label

    @property
    def script(self) -> str:
        return self.family.kohya_script

    @property
    def trainer_class(self) -> str:
        return self.family.kohya_trainer_class

    @property
    def module(self) -> str:
        return os.path.splitext(self.script)[0]

    @property
    def defaults(self) -> dict[str, Any]:
        """The ADT settings the family's presets state (adt_plugin/presets/families/<family>.toml)."""
        return defaults_for(self.family)

    # the trainer's side, for this family
    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.calls.batch_keys

    @property
    def live_uncond(self) -> bool:
        return self.calls.live_uncond

    def scheduler_config(self, trainer: Any, args: Any) -> dict[str, Any]:
        return self.calls.scheduler_config(self.family, trainer, args)

    def training(self, args: Any) -> ModelFamily:
        return self.calls.training(self.family, args)

    def pack_cond(self, ctx: KohyaContext, text_conds: list, batch: Mapping[str, Any]) -> dict:
        return self.calls.pack_cond(ctx, text_conds, batch)

    def encode_prompt(self, ctx: KohyaContext, text_encoders: list, prompt: str = "") -> list:
        return self.calls.encode_prompt(ctx, text_encoders, prompt)

    def denoise(self, ctx: KohyaContext, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, Any],
                family: Optional[ModelFamily] = None) -> torch.Tensor:
        return self.calls.denoise(ctx, family or self.family, sample, timestep, cond)

    def decode(self, ctx: KohyaContext, latents: torch.Tensor) -> torch.Tensor:
        return self.calls.decode(ctx, latents)


def _checkpointing_inputs(ctx: KohyaContext, sample: torch.Tensor, conds: Sequence) -> torch.Tensor:
    """As sd-scripts does before its own model call: with gradient checkpointing
    the inputs must require grad, or (reentrant) checkpointed blocks pass no
    gradient to the LoRA weights inside them. The sample is a fresh leaf, so the
    rollout's own gradient path is unchanged."""
    if not (torch.is_grad_enabled() and getattr(ctx.args, "gradient_checkpointing", False)):
        return sample
    for cond in conds:
        if cond is not None and cond.is_floating_point() and not cond.requires_grad:
            cond.requires_grad_(True)
    return sample.detach().requires_grad_(True)


#: every sd-scripts script a family names, in the families' order
SCRIPTS: tuple[str, ...] = tuple(dict.fromkeys(f.kohya_script for f in MODEL_FAMILIES.values() if f.kohya_script))


def families_of_script(script: str) -> list[ModelFamily]:
    """The families an sd-scripts script trains (train_network.py: SD1 and SD2; flux_train_network.py:
    FLUX.1-dev and schnell), the base families (no `variant_of`) first."""
    base = os.path.basename(script)
    found = [f for f in MODEL_FAMILIES.values() if f.kohya_script == base and f.kohya_trainer_class in CALLS]
    if not found:
        raise ValueError(f"{script}: not an sd-scripts LoRA training script ADT supports; use one of {', '.join(SCRIPTS)}")
    return sorted(found, key=lambda f: bool(f.variant_of))


def model_for_script(script: str, checkpoint: Optional[str] = None) -> KohyaModel:
    """The model an sd-scripts script trains. Where a script trains several families that
    differ in more than a name (FLUX.1-dev and schnell: guidance, sampler), the checkpoint
    (`--pretrained_model_name_or_path`) decides, read before anything loads (keys only);
    SD1 / SD2 share everything ADT needs from a family here: SD1's unless the checkpoint says SD2."""
    candidates = families_of_script(script)
    if len(candidates) == 1:
        return KohyaModel(candidates[0])
    same_weights = all(interchangeable(candidates[0].name, f.name) for f in candidates)
    if checkpoint:
        try:
            found = family_for(checkpoint)
        except FamilyError as err:
            if same_weights:
                return KohyaModel(candidates[0])
            raise ValueError(f"--pretrained_model_name_or_path: {err}") from None
        for family in candidates:
            if family.name == found.name:
                return KohyaModel(family)
        labels = " or ".join(f.label for f in candidates)
        raise ValueError(f"--pretrained_model_name_or_path {checkpoint} holds a {found.label} model, "
                         f"but {os.path.basename(script)} trains {labels}")
    if same_weights:
        return KohyaModel(candidates[0])
    labels = " or ".join(f.label for f in candidates)
    raise ValueError(f"{os.path.basename(script)} trains {labels}: give --pretrained_model_name_or_path "
                     "(on the command line or in --config_file) so that ADT can tell which")


__all__ = [
    "CALLS", "FLUX_TEXT_KEYS", "KohyaContext", "KohyaModel", "NetworkTrainerCalls", "SCRIPTS", "families_of_script",
    "model_for_script",
]
