"""The smallest checkpoint ComfyUI's `load_checkpoint_guess_config` takes for SD1.x.

What ComfyUI (comfy/model_detection.py, comfy/supported_models.py, comfy/sd.py at
a125cd84) needs, found by reading it:

* UNet keys in the original LDM layout under `model.diffusion_model.`; the
  architecture is read from the keys (levels, res blocks, transformer depth), and
  SD1.5 is matched on model_channels 320, context_dim 768 (attn2.to_k input),
  conv proj_in, no label embedding, no temporal layers. So the width is fixed but
  the depth is free: one level, one res block, one transformer block (22M params).
* The text encoder is always built at full CLIP-L size from ComfyUI's own config
  (sd1_clip_config.json), and weights missing from the file are left
  uninitialised, so the file carries a full (random) CLIP-L text model (123M).
* The VAE is built with the SD config (ch 128, mult 1-2-4-4) whatever the file
  holds; diffusers-named VAE keys are converted by ComfyUI, so a random diffusers
  AutoencoderKL at SD size is stored under `first_stage_model.` (84M).
Stored in fp16: about 450 MB, written in a few seconds.
"""

from __future__ import annotations

import re

import torch


def diffusers_unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel (SD1.x layout) to LDM keys."""
    n = layers_per_block
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for key, value in state.items():
        new = key
        for a, b in fixed.items():
            if key.startswith(a + "."):
                new = b + key[len(a):]
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"input_blocks.{1 + i * (n + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            new = f"middle_block.{1 if m[1] == 'attentions' else 2 * int(m[2])}.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            new = f"output_blocks.{i * (n + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            has_attention = any(k.startswith(f"up_blocks.{m[1]}.attentions.") for k in state)
            new = f"output_blocks.{int(m[1]) * (n + 1) + n}.{2 if has_attention else 1}.conv.{m[2]}"
        if new.startswith(("input_blocks", "middle_block", "output_blocks")):
            parts = new.split(".")
            depth = 2 if new.startswith("middle_block") else 3  # middle_block.i / input_blocks.i.j
            block, rest = ".".join(parts[:depth]), ".".join(parts[depth:])
            for a, b in resnet.items():
                if rest.startswith(a + "."):
                    new = f"{block}.{b}{rest[len(a):]}"
        out[new] = value
    return out


def tiny_sd15_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def sd15_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    return CLIPTextModel(config)


def sd15_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    )


def build_checkpoint(seed: int = 0):
    """(checkpoint tensors in ComfyUI's SD1.x layout, the diffusers UNet, the text encoder)."""
    torch.manual_seed(seed)
    unet, text, vae = tiny_sd15_unet(), sd15_text_encoder(), sd15_vae()
    sd = {f"model.diffusion_model.{k}": v for k, v in diffusers_unet_to_ldm(unet.state_dict(), 1).items()}
    for key, value in text.state_dict().items():
        if "position_ids" not in key:
            sd[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = value
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    return {k: v.to(torch.float16).contiguous() for k, v in sd.items()}, unet, text


def tiny_sd3_transformer():
    """The smallest MMDiT ComfyUI detects as SD3 (comfy/model_detection.py at a125cd84):
    it reads the depth from x_embedder (hidden = 64 x depth, one head per 64 channels),
    16 latent channels, the context width 4096 (CLIP-L padded, T5's width) and the
    pooled width 2048 (CLIP-L + CLIP-G) its text encoder produces."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=4096, caption_projection_dim=128, pooled_projection_dim=2048,
        pos_embed_max_size=32,
    )


def build_sd3_checkpoint(seed: int = 0):
    """(checkpoint tensors in ComfyUI's SD3 layout, the diffusers transformer). Text
    encoders: CLIP-L only (ComfyUI builds the SD3 encoder from the ones present), at full
    size (ComfyUI's own config); the SD3 VAE (16 latent channels, no quant convs)."""
    from diffusers import AutoencoderKL

    from adt_plugin.train.keymap import to_original_state_dict

    torch.manual_seed(seed)
    transformer, text = tiny_sd3_transformer(), sd15_text_encoder()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    original = to_original_state_dict("sd3", transformer.state_dict(), transformer.config)
    sd = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    for key, value in text.state_dict().items():
        if "position_ids" not in key:
            sd[f"text_encoders.clip_l.transformer.text_model.{key.removeprefix('text_model.')}"] = value
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    return {k: v.to(torch.float16).contiguous() for k, v in sd.items()}, transformer


def tiny_flux_transformer():
    """The smallest FLUX.1 transformer ComfyUI detects as FLUX (comfy/model_detection.py
    at a125cd84): it infers only the depths, the input channels, `vec_in_dim` (from
    vector_in) and the guidance embedding (from guidance_in) from the weights and fixes
    the rest at FLUX.1's sizes (hidden 3072 = 24 heads x 128, context 4096, rope axes
    16/56/56). So: one double and one single block (548M parameters), the pooled width
    2048 the CLIP-L-only SD3 text encoder gives (see `build_flux_files`)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=2048, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )


def flux_vae():
    """FLUX.1's VAE architecture (16 latent channels, no quant convs) at SD size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def build_flux_files(seed: int = 0):
    """Separate files, as FLUX.1 is shipped and loaded in ComfyUI (UNETLoader, CLIPLoader,
    VAELoader): (FLUX.1-dev transformer in BFL's layout, the same without guidance_in
    (schnell's layout), a CLIP-L text encoder, the VAE, the diffusers transformer).

    The text encoder cannot be FLUX's own: ComfyUI builds T5-XXL (4.7B parameters) at full
    size whatever the file holds. CLIPLoader's `sd3` type with a CLIP-L file gives the
    context FLUX reads (CLIP-L's tokens zero-padded to T5's width 4096) and a 2048-wide
    pooled vector (CLIP-L's + zeros for CLIP-G), hence vec_in_dim 2048 here (768 in
    FLUX.1, where the pooled vector is CLIP-L's alone)."""
    from adt_plugin.train.keymap import to_original_state_dict

    torch.manual_seed(seed)
    transformer, text, vae = tiny_flux_transformer(), sd15_text_encoder(), flux_vae()
    dev = to_original_state_dict("flux_dev", transformer.state_dict(), transformer.config)
    dev = {k: v.to(torch.bfloat16).contiguous() for k, v in dev.items()}
    schnell = {k: v for k, v in dev.items() if not k.startswith("guidance_in.")}
    clip_l = {f"text_model.{k.removeprefix('text_model.')}": v.to(torch.float16).contiguous()
              for k, v in text.state_dict().items() if "position_ids" not in k}
    clip_l["text_projection.weight"] = torch.randn(768, 768, dtype=torch.float16) / 768**0.5  # CLIP-L's, unused by FLUX
    vae_sd = {k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    return dev, schnell, clip_l, vae_sd, transformer
