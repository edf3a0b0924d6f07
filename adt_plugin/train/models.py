"""Model families and the adapter the core's strategies call.

A family knows how its pipeline turns captions into conditioning and how its
denoiser is called; everything else (the sampler, the losses, the rollout) is
shared. Conditioning dicts, batched on dim 0:

    sd1, sd2   encoder_hidden_states
    sdxl       encoder_hidden_states, text_embeds (pooled), time_ids (size conditioning)
    sd3        encoder_hidden_states, pooled_projections

Text encoding reuses the diffusers pipeline's own `encode_prompt`, so training
sees exactly the conditioning inference builds (clip skip, SDXL's penultimate
layer, SD3's CLIP + T5 layout, SDXL's zero unconditional embedding).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Mapping, Optional

import torch

from ..adapter import Cond


class Family:
    name = ""
    pipeline_class = ""
    denoiser_attr = "unet"
    text_keys: tuple[str, ...] = ("encoder_hidden_states",)
    # What sd-scripts trains by default: every linear (and 1x1 conv) layer of the
    # attention blocks. peft matches these as module-name suffixes.
    lora_targets: tuple[str, ...] = (
        "proj_in",
        "proj_out",
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
    )
    base_model_version = ""  # sd-scripts' ss_base_model_version
    architecture = ""  # modelspec.architecture (Stability AI model spec)
    implementation = "diffusers"

    def encode_text(self, pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": embeds}

    def empty_text(self, pipe, device) -> dict[str, torch.Tensor]:
        """The unconditional text conditioning as the pipeline builds it for guidance, batch 1."""
        return self.encode_text(pipe, [""], device)

    def size_cond(self, size_cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample conditioning that is not text (SDXL's size embedding)."""
        return {}

    def denoise(self, denoiser, sample, timestep, cond: Cond) -> torch.Tensor:
        return denoiser(sample, timestep, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


class SdFamily(Family):
    def __init__(self, name: str):
        self.name = name
        self.pipeline_class = "StableDiffusionPipeline"
        self.base_model_version = "sd_v1" if name == "sd1" else "sd_v2"
        self.architecture = "stable-diffusion-v1" if name == "sd1" else "stable-diffusion-v2-512"


class SdxlFamily(Family):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_keys = ("encoder_hidden_states", "text_embeds")
    base_model_version = "sdxl_base_v1-0"
    architecture = "stable-diffusion-xl-v1-base"
    implementation = "https://github.com/Stability-AI/generative-models"

    def encode_text(self, pipe, captions, device):
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def empty_text(self, pipe, device):
        empty = self.encode_text(pipe, [""], device)
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):  # what SDXL's pipeline uses for guidance
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


class Sd3Family(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_attr = "transformer"
    text_keys = ("encoder_hidden_states", "pooled_projections")
    lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    base_model_version = "sd3"
    architecture = "stable-diffusion-3"
    implementation = "https://github.com/Stability-AI/generative-models"

    def encode_text(self, pipe, captions, device):
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, captions, captions, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def denoise(self, denoiser, sample, timestep, cond):
        return denoiser(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]


FAMILIES: dict[str, Family] = {"sd1": SdFamily("sd1"), "sd2": SdFamily("sd2"), "sdxl": SdxlFamily(), "sd3": Sd3Family()}


def encode_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> the latents the denoiser is trained on (the posterior's
    mode, shifted and scaled as the VAE's config says). The mode, not a sample:
    cached and uncached runs then see the same latents."""
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        mode = vae.encode(pixels.to(vae.device, dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mode.float() - shift) * float(vae.config.scaling_factor)


class DiffusersAdapter:
    """The core's ModelAdapter over a diffusers denoiser of one family."""

    def __init__(
        self,
        family: Family,
        denoiser: torch.nn.Module,
        scheduler_config: Mapping[str, Any],
        uncond_text: Mapping[str, torch.Tensor],
        decoder: Callable[[torch.Tensor], torch.Tensor],
        autocast: Callable[[], ContextManager] = nullcontext,
    ):
        self.family = family
        self.denoiser = denoiser
        self.scheduler_config = scheduler_config
        self.uncond_text = dict(uncond_text)
        self.decoder = decoder
        self.autocast = autocast

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        with self.autocast():
            out = self.family.denoise(self.denoiser, sample, timestep, cond)
        return out.to(sample.dtype)  # the sampler's arithmetic stays in the latents' precision

    def uncond(self, cond: Cond) -> dict[str, Optional[torch.Tensor]]:
        batch = next(v for v in cond.values() if v is not None).shape[0]
        out = dict(cond)
        for key, value in self.uncond_text.items():
            out[key] = value.to(cond[key].device, cond[key].dtype).expand(batch, *value.shape[1:])
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # No autocast: the VAE runs in its own dtype (float32 for SDXL under fp16, where
        # its activations overflow); LatentDecoder casts the latents to it.
        return self.decoder(latents).float()
