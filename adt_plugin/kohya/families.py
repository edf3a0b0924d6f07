"""What differs between sd-scripts' SD1.x/2.x, SDXL and SD3 LoRA trainers.

Each family knows: which sd-scripts script and trainer class it wraps, the
inference scheduler config the rollout follows, how sd-scripts' text
conditioning (a list of tensors) becomes the core's conditioning dict and back,
how the denoiser is called (through sd-scripts' own `call_unet` for SD/SDXL; the
MMDiT call of `Sd3NetworkTrainer.get_noise_pred_and_target` for SD3), how the
empty prompt is encoded, and how latents are decoded.

Mirrors sd-scripts main @ 48d368fa557731ad0488c07304dfeba8c07910eb
(train_network.py, sdxl_train_network.py, sd3_train_network.py,
library/strategy_sd*.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from ..presets import family_adt_defaults

# sd-scripts' SD3 sampler uses shift 3.0 (sd3_train_utils.do_sample), as does SD3's own scheduler config
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


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


class Family:
    name = "sd"
    label = "SD 1.x / 2.x"
    script = "train_network.py"
    trainer_class = "NetworkTrainer"
    batch_keys: tuple[str, ...] = ()
    #: re-encode the empty prompt with the live text encoders when they are trained
    live_uncond = True
    #: the family's own ADT settings (sampler, CFG, D lr), from the presets' single source:
    #: adt_plugin/presets/families/<family>.toml [adt]
    defaults: Mapping[str, Any] = family_adt_defaults("sd1")

    @property
    def module(self) -> str:
        return os.path.splitext(self.script)[0]

    # -- the rollout's scheduler -------------------------------------------------
    def scheduler_config(self, trainer: Any, args: Any) -> dict[str, Any]:
        """sd-scripts' own DDPM betas, with the prediction type and zero-SNR flag of
        this run, spaced as the SD/SDXL diffusers pipelines space inference steps."""
        config = {k: v for k, v in dict(trainer.get_noise_scheduler(args, torch.device("cpu")).config).items()}
        config.update(
            prediction_type="v_prediction" if getattr(args, "v_parameterization", False) else "epsilon",
            steps_offset=1,
            set_alpha_to_one=False,
            clip_sample=False,
        )
        if getattr(args, "zero_terminal_snr", False):
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return config

    # -- conditioning ------------------------------------------------------------
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

    # -- the model calls ---------------------------------------------------------
    def denoise(self, ctx: KohyaContext, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
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


class SdxlFamily(Family):
    name = "sdxl"
    label = "SDXL"
    script = "sdxl_train_network.py"
    trainer_class = "SdxlNetworkTrainer"
    batch_keys = ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw")  # read by SdxlNetworkTrainer.call_unet
    defaults = family_adt_defaults("sdxl")


class Sd3Family(Family):
    name = "sd3"
    label = "SD3"
    script = "sd3_train_network.py"
    trainer_class = "Sd3NetworkTrainer"
    live_uncond = False  # T5 may be cached/offloaded: the empty prompt of the base text encoders is used
    defaults = family_adt_defaults("sd3")

    def scheduler_config(self, trainer: Any, args: Any) -> dict[str, Any]:
        return dict(SD3_SCHEDULER_CONFIG)

    def pack_cond(self, ctx: KohyaContext, text_conds: list, batch: Mapping[str, Any]) -> dict[str, Optional[torch.Tensor]]:
        # as Sd3NetworkTrainer.get_noise_pred_and_target: [lg_out, t5_out, lg_pooled, masks...] -> context, y
        lg_out, t5_out, lg_pooled = text_conds[:3]
        context, pooled = ctx.text_encoding_strategy.concat_encodings(lg_out, t5_out, lg_pooled)
        return {"context": context.to(ctx.device), "pooled": pooled.to(ctx.device)}

    def text_part(self, cond: Mapping[str, Any]) -> list:
        return [cond["context"], cond["pooled"]]

    def encode_prompt(self, ctx: KohyaContext, text_encoders: list, prompt: str = "") -> list:
        args = ctx.args
        tokens = ctx.tokenize_strategy.tokenize(prompt)
        with ctx.accelerator.autocast():
            return ctx.text_encoding_strategy.encode_tokens(
                ctx.tokenize_strategy, text_encoders, tokens, args.apply_lg_attn_mask, args.apply_t5_attn_mask, enable_dropout=False
            )

    def denoise(self, ctx: KohyaContext, sample: torch.Tensor, timestep: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        context, pooled = cond["context"], cond["pooled"]
        sample = _checkpointing_inputs(ctx, sample.to(ctx.weight_dtype), [context, pooled])
        with ctx.accelerator.autocast():
            out = ctx.unet(sample, timestep.float(), context=context, y=pooled)
        return out.float()

    def decode(self, ctx: KohyaContext, latents: torch.Tensor) -> torch.Tensor:
        vae = ctx.vae
        dtype = ctx.vae_dtype or next(vae.parameters()).dtype
        return vae.decode(type(vae).process_out(latents).to(dtype)).float()


def _checkpointing_inputs(ctx: KohyaContext, sample: torch.Tensor, conds: list) -> torch.Tensor:
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


FAMILIES: dict[str, Family] = {f.name: f for f in (Family(), SdxlFamily(), Sd3Family())}


def family_for_script(script: str) -> Family:
    base = os.path.basename(script)
    for family in FAMILIES.values():
        if base == family.script:
            return family
    known = ", ".join(f.script for f in FAMILIES.values())
    raise ValueError(f"{script}: not an sd-scripts LoRA training script ADT supports; use one of {known}")


__all__ = ["FAMILIES", "Family", "KohyaContext", "Sd3Family", "SdxlFamily", "family_for_script"]
