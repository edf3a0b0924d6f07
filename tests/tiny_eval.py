"""Tiny random models on disk for the eval and ComfyUI tests (no downloads)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from tiny import DDPM_CONFIG


def write_tiny_clip_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer from a hand-written vocab (letters, digits, one merge
    chain for 'cat'); returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*chars, *(c + "</w>" for c in chars), "at</w>", "ca", "cat</w>"]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\na t</w>\nc a\nca t</w>\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}))
    return len(vocab)


def tiny_clip_folder(folder: Path, image_size: int = 16, seed: int = 0) -> Path:
    """A random transformers CLIPModel + tokenizer saved like a Hub folder."""
    from transformers import CLIPConfig, CLIPModel

    vocab_size = write_tiny_clip_tokenizer(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=image_size, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(str(folder))
    return folder


def tiny_dinov2_folder(folder: Path, seed: int = 0) -> Path:
    """A random 2-block DINOv2 with the real patch size (14), so 224 px is 256 tokens."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=224)
    Dinov2Model(config).save_pretrained(str(folder))
    return folder


def tiny_sd_folder(folder: Path, seed: int = 0) -> Path:
    """A random StableDiffusionPipeline (16x16 images) saved as a diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = folder.parent / f"{folder.name}-tokenizer"
    vocab_size = write_tiny_clip_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), norm_num_groups=8, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77))
    scheduler = DDIMScheduler(**{k: v for k, v in DDPM_CONFIG.items() if k != "_class_name"})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder


def kohya_lora_for(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, rank: int = 2, scale: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """kohya-format LoRA tensors (lora_unet_* / lora_te_*, lora_down / lora_up / alpha)
    on the attention projections, with random non-zero up weights so it has an effect."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def add(prefix: str, name: str, module: torch.nn.Linear) -> None:
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * scale
        tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * scale
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))

    targets = ("to_q", "to_k", "to_v", "to_out.0")
    for name, module in unet.named_modules():
        if name.endswith(targets) and isinstance(module, torch.nn.Linear):
            add("lora_unet_", name, module)
    for name, module in (text_encoder.named_modules() if text_encoder is not None else []):
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) and isinstance(module, torch.nn.Linear):
            # kohya names text-encoder modules from `text_model.` (transformers 5 modules may lack that level)
            add("lora_te_text_model_", name.removeprefix("text_model."), module)
    return tensors
