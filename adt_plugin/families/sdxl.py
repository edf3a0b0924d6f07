"""SDXL: a UNet on 4-channel latents, two CLIP text encoders, size conditioning.

Conditioning: the penultimate hidden states of both encoders concatenated
(`encoder_hidden_states`), the second encoder's pooled output (`text_embeds`) and
the six size numbers (original h, w, crop top, left, target h, w: `time_ids`).
Its pipeline guides against zeros, not the encoded empty prompt, when the
pipeline config says `force_zeros_for_empty_prompt` (the base model does). Its
VAE overflows in fp16: it runs in float32 when training in fp16.
"""

from __future__ import annotations

import torch

from .base import Guidance, LoraNames, ModelFamily, UNET_LORA_TARGETS, VaeSpec


class SdxlFamily(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    denoiser_class = "UNet2DConditionModel"
    denoiser_attr = "unet"
    prediction = "epsilon"
    guidance = Guidance("cfg")
    default_latent_size = (128, 128)
    cond_keys = ("encoder_hidden_states", "text_embeds", "time_ids")
    text_keys = ("encoder_hidden_states", "text_embeds")
    vae = VaeSpec(latent_channels=4, scaling_factor=0.13025, fp32_under_fp16=True)
    lora = LoraNames(UNET_LORA_TARGETS, "ldm_unet")
    # the paper's SDXL settings
    preset = {"sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 5.0, "d_lr": 1e-6}
    base_model_version = "sdxl_base_v1-0"
    architecture = "stable-diffusion-xl-v1-base"
    implementation = "https://github.com/Stability-AI/generative-models"
    config_repo = "stabilityai/stable-diffusion-xl-base-1.0"
    kohya_script = "sdxl_train_network.py"
    onetrainer_model_types = ("STABLE_DIFFUSION_XL_10_BASE",)

    def matches_config(self, denoiser_config, text_config):
        return denoiser_config.get("addition_embed_type") == "text_time" if denoiser_config else True

    def matches_keys(self, keys, shapes):
        return any(k.startswith("conditioner.embedders.1.") or "label_emb.0.0" in k or "add_embedding.linear_1" in k for k in keys)

    def encode_text(self, pipe, captions, device):
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def empty_text(self, pipe, device):
        empty = self.encode_text(pipe, [""], device)
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):  # what SDXL's pipeline guides against
            empty = {k: torch.zeros_like(v) for k, v in empty.items()}
        return empty

    def size_cond(self, size_cond):
        # (original h, w, crop top, left, target h, w): SDXL's add_time_ids
        return {"time_ids": size_cond.float()}

    def denoise(self, denoiser, sample, timestep, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return denoiser(
            sample,
            timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


SDXL = SdxlFamily()
FAMILIES = (SDXL,)
