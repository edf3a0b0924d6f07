"""Tiny random models in the formats the real trainers load (built at test time,
nothing is downloaded). Used by the integration tests that run sd-scripts /
OneTrainer for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def tiny_clip_tokenizer(folder: Path, model_max_length: int = 77) -> int:
    """A CLIPTokenizer from a hand-written byte-level vocab (no merges); returns the vocab size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + list(CLIP_SPECIALS)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    tok.save_pretrained(str(folder))
    return len(tokens)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def tiny_clip_text_model(vocab_size: int, hidden: int = 32, layers: int = 2, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_vae(seed: int = 0, latent_channels: int = 4, width: int = 32):
    """AutoencoderKL with the 8x downsampling of the real ones, `width` channels wide."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(width,) * 4, layers_per_block=1, norm_num_groups=min(32, width), sample_size=64,
    )


def sd15_shaped_unet(cross_attention_dim: int, seed: int = 0):
    """The SD1.x UNet layout (sd-scripts' original_unet hard-codes its widths
    320/640/1280/1280), with a small cross-attention width. ~860M random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    )


SD_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon",
}


def tiny_sd15_diffusers(folder: Path, tokenizer_folder: Path) -> Path:
    """A diffusers StableDiffusionPipeline folder sd-scripts' train_network.py loads
    (tokenizer loaded separately, from `tokenizer_folder`)."""
    from diffusers import DDIMScheduler

    vocab = tiny_clip_tokenizer(tokenizer_folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_encoder = tiny_clip_text_model(vocab)
    text_encoder.save_pretrained(str(folder / "text_encoder"))
    tiny_vae().save_pretrained(str(folder / "vae"))
    sd15_shaped_unet(text_encoder.config.hidden_size).to(torch.float16).save_pretrained(str(folder / "unet"))
    DDIMScheduler.from_config(SD_SCHEDULER).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.32.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }))
    return folder


def tiny_unet(cross_attention_dim: int, seed: int = 0):
    """A small diffusers UNet2DConditionModel with cross-attention (OneTrainer uses diffusers' class itself)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    )


def tiny_sd15_full_diffusers(folder: Path) -> Path:
    """A complete small diffusers SD1.x folder, tokenizer included (what OneTrainer loads)."""
    from diffusers import DDIMScheduler

    vocab = tiny_clip_tokenizer(folder / "tokenizer")
    text_encoder = tiny_clip_text_model(vocab)
    text_encoder.save_pretrained(str(folder / "text_encoder"))
    tiny_vae().save_pretrained(str(folder / "vae"))
    tiny_unet(text_encoder.config.hidden_size).save_pretrained(str(folder / "unet"))
    DDIMScheduler.from_config(SD_SCHEDULER).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.32.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return folder


def tiny_sdxl_full_diffusers(folder: Path) -> Path:
    """A complete small diffusers SDXL folder: two tokenizers and text encoders (the
    second with a projection), a UNet with SDXL's text-and-size embedding
    (`addition_embed_type="text_time"`), an 8x VAE. What OneTrainer's SDXL loader reads."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    vocab = tiny_clip_tokenizer(folder / "tokenizer")
    tiny_clip_tokenizer(folder / "tokenizer_2")
    text_encoder = tiny_clip_text_model(vocab, hidden=32, seed=0)
    text_encoder_2 = tiny_clip_text_model(vocab, hidden=32, projection=True, seed=1)
    text_encoder.save_pretrained(str(folder / "text_encoder"))
    text_encoder_2.save_pretrained(str(folder / "text_encoder_2"))
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's
    vae.save_pretrained(str(folder / "vae"))
    torch.manual_seed(0)
    time_dim = 8
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim, use_linear_projection=True,
    ).save_pretrained(str(folder / "unet"))
    DDIMScheduler.from_config({**SD_SCHEDULER, "timestep_spacing": "leading"}).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.32.1", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return folder


def sdxl_diffusers_for_sd_scripts(folder: Path, tokenizer_folder: Path, unet_config: dict) -> Path:
    """A diffusers SDXL folder sd-scripts' sdxl_train_network.py loads: sd-scripts converts
    the UNet to its own SDXL UNet, whose sizes are fixed (`unet_config` is sd-scripts'
    DIFFUSERS_SDXL_UNET_CONFIG: 2.6B random weights, made and saved in bfloat16, ~5 GB),
    and reads text encoder 1's hidden_states[11] (12 layers of width 768) and text encoder
    2's penultimate layer and projection (width 1280; 768 + 1280 = the UNet's 2048-wide
    cross-attention). Tokenizers are read from `tokenizer_folder` (--tokenizer_cache_dir)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    vocab = tiny_clip_tokenizer(tokenizer_folder / "openai_clip-vit-large-patch14")
    tiny_clip_tokenizer(tokenizer_folder / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k")
    tiny_clip_tokenizer(folder / "tokenizer_2")  # the pipeline loader wants it; sd-scripts uses the cached ones
    tiny_clip_text_model(vocab, hidden=768, layers=12, seed=0).save_pretrained(str(folder / "text_encoder"))
    tiny_clip_text_model(vocab, hidden=1280, layers=2, projection=True, seed=1).save_pretrained(str(folder / "text_encoder_2"))
    tiny_vae().save_pretrained(str(folder / "vae"))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = UNet2DConditionModel(**unet_config)
    finally:
        torch.set_default_dtype(torch.float32)
    unet.save_pretrained(str(folder / "unet"))
    del unet
    DDIMScheduler.from_config({**SD_SCHEDULER, "timestep_spacing": "leading"}).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.32.1", "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return folder


def tiny_t5(folder: Path, d_model: int, seed: int = 0) -> None:
    """A T5 tokenizer from a hand-written unigram vocab (letters, with and without the
    word-start mark; transformers >= 5 builds T5Tokenizer from such a list, no
    sentencepiece model needed) in `folder`/tokenizer_3, and a one-layer T5 encoder in
    `folder`/text_encoder_3."""
    import string

    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(str(folder / "tokenizer_3"))
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(str(folder / "text_encoder_3"))


def tiny_sd3_full_diffusers(folder: Path) -> Path:
    """A complete small diffusers SD3 folder (what OneTrainer's SD3 loader reads; its data
    loader always tokenizes for T5): two CLIP text encoders with projections, a T5
    encoder (transformers >= 5, see `tiny_t5`), an MMDiT (SD3Transformer2DModel), a
    16-channel VAE, the flow-matching scheduler with SD3's shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    vocab = tiny_clip_tokenizer(folder / "tokenizer")
    tiny_clip_tokenizer(folder / "tokenizer_2")
    tiny_clip_text_model(vocab, hidden=32, projection=True, seed=0).save_pretrained(str(folder / "text_encoder"))
    tiny_clip_text_model(vocab, hidden=32, projection=True, seed=1).save_pretrained(str(folder / "text_encoder_2"))
    tiny_t5(folder, d_model=64)
    vae = tiny_vae(latent_channels=16)
    vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's
    vae.save_pretrained(str(folder / "vae"))
    torch.manual_seed(0)
    SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=16,
    ).save_pretrained(str(folder / "transformer"))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.32.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }))
    return folder


def tiny_dinov2_folder(folder: Path, image_size: int = 224) -> Path:
    """A 4-block random DINOv2 saved like a downloaded one (config.json + weights)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=image_size)
    Dinov2Model(config).save_pretrained(str(folder))
    return folder


def tiny_image_folder(folder: Path, count: int = 4, size: int = 64, caption: str = "a photo of stripes") -> Path:
    """sd-scripts' DreamBooth layout `<folder>/<repeats>_<name>/*.png` + captions: seeded colour stripes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sub = folder / "1_stripes"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        colours = rng.integers(0, 256, size=(4, 3), dtype=np.uint8)
        image = np.repeat(colours, size // 4, axis=0)[:, None, :].repeat(size, axis=1)
        Image.fromarray(np.ascontiguousarray(np.rot90(image, i))).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(caption)
    return folder
