"""Stable Diffusion 1.x and 2.x: a UNet on 4-channel latents, CLIP (SD1) or OpenCLIP-H (SD2) text.

SD1.x predicts epsilon; SD2.x's 768 px models predict v (their scheduler config
says so; the 512 px "base" ones predict epsilon). Both guide with batched CFG
against the empty prompt. The weights have the same layout: SD2 is told from SD1
by its 1024-wide text encoder (cross-attention width) or the UNet's linear
projections.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from .base import Guidance, LoraNames, ModelFamily, UNET_LORA_TARGETS, VaeSpec


def _is_sd2_config(denoiser_config: Mapping, text_config: Optional[Mapping]) -> bool:
    """SD2.x: OpenCLIP-H text (1024 wide, hence 1024-wide cross-attention) and linear
    projections in the UNet's transformers (SD1.x: 1x1 convolutions)."""
    if text_config is not None and int(text_config.get("hidden_size", 0)) == 1024:
        return True
    return int(denoiser_config.get("cross_attention_dim", 0) or 0) == 1024 or bool(denoiser_config.get("use_linear_projection"))


def _is_sd2_keys(keys: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> bool:
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP text encoder
        return True
    for key, shape in shapes.items():
        if key.endswith("attn2.to_k.weight") and int(shape[1]) == 1024:
            return True
        if key.endswith("proj_in.weight") and len(shape) == 2:  # linear projection
            return True
    return False


def _is_sd_unet_keys(keys: Sequence[str]) -> bool:
    unet = any("input_blocks." in k for k in keys) or any(k.startswith("down_blocks.") and ".attentions." in k for k in keys)
    sdxl = any("label_emb." in k or "add_embedding." in k or k.startswith("conditioner.") for k in keys)
    return unet and not sdxl


class Sd1Family(ModelFamily):
    name = "sd1"
    label = "Stable Diffusion 1.x"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_class = "UNet2DConditionModel"
    denoiser_attr = "unet"
    prediction = "epsilon"
    guidance = Guidance("cfg")
    default_latent_size = (64, 64)
    vae = VaeSpec(latent_channels=4, scaling_factor=0.18215)
    # sd-scripts trains SD1/SD2 on diffusers' UNet: its LoRA names are diffusers module names
    lora = LoraNames(UNET_LORA_TARGETS, "ldm_unet", kohya_names="diffusers")
    # the paper's SD1.5 settings (the core's defaults)
    preset = {"sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 7.0}
    base_model_version = "sd_v1"
    architecture = "stable-diffusion-v1"
    config_repo = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    kohya_script = "train_network.py"
    onetrainer_model_types = ("STABLE_DIFFUSION_15",)

    def matches_config(self, denoiser_config, text_config):
        return not _is_sd2_config(denoiser_config, text_config)

    def matches_keys(self, keys, shapes):
        return _is_sd_unet_keys(keys) and not _is_sd2_keys(keys, shapes)


class Sd2Family(Sd1Family):
    name = "sd2"
    label = "Stable Diffusion 2.x"
    prediction = "v_prediction"  # the 768 px models; the scheduler config decides
    preset = {"sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 7.0}
    base_model_version = "sd_v2"
    architecture = "stable-diffusion-v2-512"
    variant_of = "sd1"  # the same UNet layout: either name runs either
    config_repo = "stabilityai/stable-diffusion-2-1"
    onetrainer_model_types = (
        "STABLE_DIFFUSION_20",
        "STABLE_DIFFUSION_20_BASE",
        "STABLE_DIFFUSION_21",
        "STABLE_DIFFUSION_21_BASE",
    )

    def matches_config(self, denoiser_config, text_config):
        return _is_sd2_config(denoiser_config, text_config)

    def model_spec(self, prediction_type):
        spec = {**super().model_spec(prediction_type), "ss_v2": "True"}
        if prediction_type == "v_prediction":  # the 768 px models
            spec.update({"ss_base_model_version": "sd_v2_v", "modelspec.architecture": "stable-diffusion-v2-768-v"})
        return spec

    def matches_keys(self, keys, shapes):
        return (_is_sd_unet_keys(keys) or any(k.startswith("cond_stage_model.model.") for k in keys)) and _is_sd2_keys(keys, shapes)


SD1 = Sd1Family()
SD2 = Sd2Family()
FAMILIES = (SD2, SD1)  # SD2 first: its rules are the narrower ones


