"""FLUX.1 (dev and schnell): a double/single-stream DiT on 16-channel latents, flow matching.

Sampling, as diffusers' FluxPipeline: flow-matching Euler at sigmas
linspace(1, 1/n, n); dev shifts them by exp(mu) with mu linear in the image's
token count (`calculate_shift`, from the scheduler config's base/max_image_seq_len
and base/max_shift), so the timesteps depend on the resolution; schnell's config
has a static shift of 1.

Guidance: dev is guidance-distilled: the guidance value (3.5 by default) is an
input of the transformer and one pass guides ("embedded"); schnell is distilled
to 4 steps without guidance ("none"). Training-time calls of dev (the FT loss,
ADT's diffusion term) feed `Guidance.train_value`, sd-scripts' and diffusers'
default 3.5 (OneTrainer's default is 1.0).

The transformer takes the latents packed into 2x2 patches (tokens of 4 x 16
channels) with position ids (0, row, col) per token and zeros for the text
tokens; `denoise` packs and unpacks, so the core sees [B, 16, H, W]. Text: T5-XXL
hidden states (`encoder_hidden_states`) and CLIP-L's pooled output
(`pooled_projections`). The VAE is the 16-channel one with a shift factor.
"""

from __future__ import annotations

import torch

from ..adapter import Cond
from .base import Guidance, LoraNames, ModelFamily, VaeSpec, embedded_guidance

# Every linear layer of the double- and single-stream blocks, modulations included:
# what sd-scripts' networks/lora_flux.py trains by default (every Linear inside
# DoubleStreamBlock and SingleStreamBlock). peft matches suffixes, so the final layer's
# top-level `proj_out` is excluded by name (FLUX_LORA_EXCLUDE).
FLUX_LORA_TARGETS = (
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
    "proj_mlp",
    "proj_out",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
)
FLUX_LORA_EXCLUDE = "proj_out"


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W], the inverse of `pack_latents`."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(0, row, col) for each 2x2 patch of an [H, W] latent, [(H/2)(W/2), 3]."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(ModelFamily):
    name = "flux_dev"
    label = "FLUX.1-dev"
    pipeline_class = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    denoiser_attr = "transformer"
    prediction = "flow"
    latent_multiple = 2  # the transformer patchifies 2x2 latents
    guidance = Guidance("embedded", train_value=3.5)
    sigmas = "linspace"
    patch = 2
    default_latent_size = (128, 128)
    cond_keys = ("encoder_hidden_states", "pooled_projections")
    text_keys = ("encoder_hidden_states", "pooled_projections")
    vae = VaeSpec(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    # sd-scripts' layout (lora_unet_double_blocks_0_img_attn_qkv, ...), what ComfyUI and
    # sd-scripts read; diffusers' converter reads it too, at FLUX.1's real widths
    lora = LoraNames(
        FLUX_LORA_TARGETS,
        "flux",
        exclude=FLUX_LORA_EXCLUDE,
        diffusers_reads_kohya=False,
        text_encoders=(("lora_te1_", "text_encoder"),),
        network_module="networks.lora_flux",
    )
    preset = {"sampler": "flow_euler", "num_inference_steps": 28, "guidance_scale": 3.5}
    base_model_version = "flux1"
    architecture = "flux-1-dev"
    implementation = "https://github.com/black-forest-labs/flux"
    kohya_script = "flux_train_network.py"
    onetrainer_model_types = ("FLUX_DEV_1",)
    #: T5 tokens (the pipeline's max_sequence_length)
    max_sequence_length = 512

    def matches_config(self, denoiser_config, text_config):
        return denoiser_config.get("guidance_embeds") is True

    def matches_keys(self, keys, shapes):
        flux = any("double_blocks." in k or "single_transformer_blocks." in k for k in keys)
        return flux and any("guidance_in." in k or "guidance_embedder." in k for k in keys)

    def encode_text(self, pipe, captions, device):
        embeds, pooled, _ = pipe.encode_prompt(
            captions, captions, device=device, num_images_per_prompt=1, max_sequence_length=self.max_sequence_length
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def pipeline_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return pack_latents(noise)  # FluxPipeline takes its `latents` packed

    def denoise(self, denoiser, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        b, _, h, w = sample.shape
        text = cond["encoder_hidden_states"]
        guidance = embedded_guidance(self, cond, b, sample.device) if self.guidance.mode == "embedded" else None
        out = denoiser(
            hidden_states=pack_latents(sample),
            timestep=timestep / 1000,  # the transformer takes sigma; it scales by 1000 itself
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype),
            img_ids=image_ids(h, w, sample.device, text.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


class FluxSchnellFamily(FluxFamily):
    name = "flux_schnell"
    label = "FLUX.1-schnell"
    guidance = Guidance("none")
    preset = {"sampler": "flow_euler", "num_inference_steps": 4, "guidance_scale": 0.0}
    architecture = "flux-1-schnell"
    max_sequence_length = 256  # what BFL's reference and diffusers' schnell example use

    def matches_config(self, denoiser_config, text_config):
        return denoiser_config.get("guidance_embeds") is False

    def matches_keys(self, keys, shapes):
        flux = any("double_blocks." in k or "single_transformer_blocks." in k for k in keys)
        return flux and not any("guidance_in." in k or "guidance_embedder." in k for k in keys)


FLUX_DEV = FluxFamily()
FLUX_SCHNELL = FluxSchnellFamily()
FAMILIES = (FLUX_DEV, FLUX_SCHNELL)
