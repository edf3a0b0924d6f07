"""Z-Image and Z-Image-Turbo (Tongyi-MAI): a single-stream DiT on 16-channel latents, flow matching.

Sampling, as diffusers' ZImagePipeline (and ComfyUI's simple scheduler with shift
3): flow-matching Euler at sigmas linspace(1, 1/n, n) (computed in float32 by
torch, as the pipeline does), shifted by the config's static shift (3.0 for
Turbo). Turbo is distilled to a few steps without guidance ("none"; Tongyi's
card: 9 steps, guidance 0). The base model guides with CFG written as
out_c + w (out_c - out_u), which is the usual form with scale w + 1
(`Guidance.cfg_offset = 1`): a value of 0 means no guidance in both.

The transformer's own convention differs from the core's: it takes a list of
[C, 1, H, W] latents and the time (1000 - t) / 1000, and outputs the negative
velocity; `denoise` converts both ways (as OneTrainer's BaseZImageSetup and the
pipeline do), so the core sees velocity = noise - x0 on [B, C, H, W].

Text: the second-to-last hidden states of a Qwen3 LM over the chat-templated
prompt, one variable-length sequence per caption. The conditioning dict holds
them padded to `max_sequence_length` with a mask (`encoder_attention_mask`), so
that a batch and its unconditional half concatenate; `denoise` strips the padding.

Turbo and base share the weight layout: detection finds `zimage`; the Turbo
family is chosen by name (the presets do).
"""

from __future__ import annotations

import torch

from ..adapter import Cond
from .base import Guidance, LoraNames, ModelFamily, VaeSpec

# OneTrainer's "attn-mlp" LoRA preset: attention and feed-forward of the main layers
# (the suffixes also match the two refiners' blocks).
ZIMAGE_LORA_TARGETS = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)


class ZImageFamily(ModelFamily):
    name = "zimage"
    label = "Z-Image"
    pipeline_class = "ZImagePipeline"
    denoiser_class = "ZImageTransformer2DModel"
    denoiser_attr = "transformer"
    prediction = "flow"
    latent_multiple = 2  # the transformer patchifies 2x2 latents
    guidance = Guidance("cfg", cfg_offset=1.0)
    sigmas = "linspace"
    patch = 2
    default_latent_size = (128, 128)
    cond_keys = ("encoder_hidden_states", "encoder_attention_mask")
    text_keys = ("encoder_hidden_states", "encoder_attention_mask")
    vae = VaeSpec(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    # diffusers' layout (transformer.<module>.lora_A / lora_B): what ZImagePipeline loads;
    # no original (single-file) layout is mapped, so full fine-tunes save diffusers folders
    lora = LoraNames(ZIMAGE_LORA_TARGETS, "", kohya_names="diffusers", file_format="diffusers")
    preset = {}  # the base model's deployed sampler is not stated here
    base_model_version = "z_image"
    architecture = "z-image"
    implementation = "https://github.com/Tongyi-MAI/Z-Image"
    onetrainer_model_types = ("Z_IMAGE",)
    #: text tokens the pipeline pads to (and truncates at)
    max_sequence_length = 512

    def matches_keys(self, keys, shapes):
        return any("noise_refiner." in k for k in keys) and any("context_refiner." in k for k in keys)

    def inference_sigmas(self, num_inference_steps: int):
        return torch.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist()

    def encode_text(self, pipe, captions, device):
        embeds, _ = pipe.encode_prompt(
            list(captions), device=device, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length
        )
        return pad_sequences(embeds, self.max_sequence_length)

    def denoise(self, denoiser, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        text, mask = cond["encoder_hidden_states"], cond["encoder_attention_mask"].bool()
        captions = [t[m] for t, m in zip(text, mask)]
        latents = list(sample.unsqueeze(2).unbind(0))  # [C, 1, H, W] each: one frame
        out = denoiser(latents, (1000 - timestep) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2).to(sample.dtype)


class ZImageTurboFamily(ZImageFamily):
    name = "zimage_turbo"
    label = "Z-Image-Turbo"
    guidance = Guidance("none", cfg_offset=1.0)
    preset = {"sampler": "flow_euler", "num_inference_steps": 9, "guidance_scale": 0.0}
    architecture = "z-image-turbo"
    variant_of = "zimage"

    def matches_config(self, denoiser_config, text_config):
        return False  # the same weights layout as Z-Image: chosen by name

    def matches_keys(self, keys, shapes):
        return False


def pad_sequences(sequences: list[torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """Variable-length [L_i, D] sequences -> {encoder_hidden_states [B, length, D] (zeros
    after each), encoder_attention_mask [B, length] (1 where a token is)}."""
    first = sequences[0]
    embeds = first.new_zeros(len(sequences), length, first.shape[-1])
    mask = torch.zeros(len(sequences), length, dtype=torch.long, device=first.device)
    for i, seq in enumerate(sequences):
        n = min(seq.shape[0], length)
        embeds[i, :n] = seq[:n]
        mask[i, :n] = 1
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


ZIMAGE = ZImageFamily()
ZIMAGE_TURBO = ZImageTurboFamily()
FAMILIES = (ZIMAGE, ZIMAGE_TURBO)
