"""Tiny random SD1.x / SD2.x (v) / SDXL / SD3 diffusers pipelines, built from configs.

Real component classes and real pipeline folders (model_index.json, configs,
tokenizer files), so the trainer's loading code runs as it does on a real model;
only the sizes are tiny. The CLIP tokenizer is written from a hand-made byte-level
vocabulary (every byte alone and as a word end, no merges).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from integration.tiny_models import _bytes_to_unicode


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Import into a test module: its tests run torch on one thread. For tiny models more
    threads only add contention (a shared 2-core CI machine runs ~100x slower with them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_tokenizer(folder: Path, max_length: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _bytes_to_unicode().values():  # the integration tests' own table, one copy
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )


VOCAB_SIZE = 2 + 2 * 256


def _clip(with_projection: bool, hidden: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=hidden,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(str(folder))


def _vae(seed: int = 0, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        **kw,
    )


def _sd_scheduler(kind: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    common = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
    )
    if kind == "sd1":
        return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)
    if kind == "sd2":
        return DDIMScheduler(prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, **common)
    return EulerDiscreteScheduler(timestep_spacing="leading", **common)


def make_pipeline(family: str, folder: Path, seed: int = 0, layers_per_block: int = 2) -> Path:
    """Build a tiny pipeline of `family` (sd1, sd2, sdxl, sd3) and save it to `folder`."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    folder = Path(folder)
    tok = _tokenizer(folder.parent / f".{folder.name}-tokenizer")
    if family in ("sd1", "sd2"):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32),
            layers_per_block=layers_per_block,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=8,
            use_linear_projection=family == "sd2",
        )
        pipe = StableDiffusionPipeline(
            vae=_vae(seed),
            text_encoder=_clip(False, seed=seed),
            tokenizer=tok,
            unet=unet,
            scheduler=_sd_scheduler(family),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32, 32),
            layers_per_block=layers_per_block,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4),
            cross_attention_dim=64,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
        pipe = StableDiffusionXLPipeline(
            vae=_vae(seed, force_upcast=False),
            text_encoder=_clip(False, seed=seed),
            text_encoder_2=_clip(True, seed=seed + 1),
            tokenizer=tok,
            tokenizer_2=tok,
            unet=unet,
            scheduler=_sd_scheduler("sdxl"),
        )
    elif family == "sd3":
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=64,
            caption_projection_dim=16,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
        )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(seed, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=_clip(True, seed=seed),
            tokenizer=tok,
            text_encoder_2=_clip(True, seed=seed + 1),
            tokenizer_2=tok,
            text_encoder_3=None,
            tokenizer_3=None,
        )
    else:
        raise ValueError(family)
    pipe.save_pretrained(str(folder))
    return folder


def make_image_folder(
    folder: Path, count: int = 4, size: tuple[int, int] = (64, 64), seed: int = 0, repeats_dir: str = ""
) -> Path:
    """`count` random images with same-name captions (in `repeats_dir`, e.g. `2_things`, if given)."""
    rng = np.random.default_rng(seed)
    target = Path(folder) / repeats_dir if repeats_dir else Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = size
        base = rng.integers(0, 255, size=3)
        image = (np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255)).astype(np.uint8)
        Image.fromarray(image).save(target / f"img{i}.png")
        (target / f"img{i}.txt").write_text(f"pic {i}")
    return Path(folder)


def save_tiny_dinov2(folder: Path, seed: int = 0, layers: int = 4) -> Path:
    """A random 4-block (or `layers`-block) DINOv2 saved like the real one, so the trainer's
    loader reads it. Patch 28 at the loader's 224 px input: 64 tokens, cheap on the CPU."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, patch_size=28, image_size=224
    )
    Dinov2Model(config).save_pretrained(str(folder))
    return Path(folder)


def _vae_original_name(name: str, num_up: int) -> str:
    """diffusers AutoencoderKL name -> the LDM name an SD1 single file uses (the inverse of
    diffusers' convert_ldm_vae_checkpoint, written out for the test checkpoint only)."""
    import re

    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.",
        ),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample."),
    ]
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name.replace(".conv_shortcut.", ".nin_shortcut.")


def write_sd1_single_file(pipeline_folder: Path, path: Path) -> Path:
    """The tiny SD1 pipeline as one original-layout checkpoint (what A1111 / civitai files look like)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from adt_plugin.train.keymap import to_original_state_dict

    unet = UNet2DConditionModel.from_pretrained(pipeline_folder / "unet")
    vae = AutoencoderKL.from_pretrained(pipeline_folder / "vae")
    text = CLIPTextModel.from_pretrained(pipeline_folder / "text_encoder")
    tensors = {
        "model.diffusion_model." + k: v
        for k, v in to_original_state_dict("sd1", unet.state_dict(), unet.config).items()
    }
    num_up = len(vae.config.up_block_types)
    for key, value in vae.state_dict().items():
        if ".mid_block.attentions.0.to_" in key and key.endswith(".weight"):
            value = value[:, :, None, None]  # the LDM VAE attention uses 1x1 convolutions
        tensors["first_stage_model." + _vae_original_name(key, num_up)] = value
    for key, value in text.state_dict().items():  # original checkpoints name the CLIP weights text_model.*
        tensors["cond_stage_model.transformer." + (key if key.startswith("text_model.") else "text_model." + key)] = (
            value
        )
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
