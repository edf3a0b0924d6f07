"""Stable Diffusion 3 / 3.5: an MMDiT on 16-channel latents, flow matching.

Rectified flow x_t = (1 - s) x0 + s eps, the denoiser predicts the velocity
eps - x0; the pipeline samples with flow-matching Euler at the scheduler's own
spacing and static shift (3.0), and guides with batched CFG against the empty
prompt. Conditioning: CLIP-L + CLIP-G (+ T5) hidden states (`encoder_hidden_states`)
and the pooled CLIP outputs (`pooled_projections`). The VAE has a shift factor.
"""

from __future__ import annotations

from .base import Guidance, LoraNames, ModelFamily, VaeSpec

MMDIT_LORA_TARGETS = (
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


class Sd3Family(ModelFamily):
    name = "sd3"
    label = "Stable Diffusion 3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    denoiser_attr = "transformer"
    prediction = "flow"
    latent_multiple = 2  # the transformer patchifies 2x2 latents
    guidance = Guidance("cfg")
    sigmas = "scheduler"
    default_latent_size = (128, 128)
    cond_keys = ("encoder_hidden_states", "pooled_projections")
    text_keys = ("encoder_hidden_states", "pooled_projections")
    vae = VaeSpec(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    # Written in diffusers' layout: diffusers has no reader for sd-scripts' SD3 names, and
    # ComfyUI reads both (train/keymap.py); `adt eval` converts sd-scripts' files.
    lora = LoraNames(
        MMDIT_LORA_TARGETS,
        "mmdit",
        file_format="diffusers",
        diffusers_reads_kohya=False,
        text_encoders=(("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")),
    )
    # the paper's SD3 settings
    preset = {"sampler": "flow_euler", "num_inference_steps": 28, "guidance_scale": 7.0, "d_lr": 1e-6}
    base_model_version = "sd3"
    architecture = "stable-diffusion-3"
    implementation = "https://github.com/Stability-AI/generative-models"
    # SD3 runs without its T5 encoder (the pipeline then uses zeros); a folder may leave it out
    optional_components = ("text_encoder_3", "tokenizer_3")
    config_repo = "stabilityai/stable-diffusion-3-medium-diffusers"
    kohya_script = "sd3_train_network.py"
    onetrainer_model_types = ("STABLE_DIFFUSION_3", "STABLE_DIFFUSION_35")

    def matches_keys(self, keys, shapes):
        return any("joint_blocks." in k for k in keys) or (
            any(k.startswith("pos_embed.proj") for k in keys) and any(".attn.add_q_proj" in k for k in keys)
        )

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


SD3 = Sd3Family()
FAMILIES = (SD3,)
