"""Tiny random FLUX.1 (dev, schnell) and Z-Image(-Turbo) diffusers pipelines, built from configs.

Real component classes (FluxTransformer2DModel with and without the guidance
embedding, ZImageTransformer2DModel, the 16-channel AutoencoderKL, CLIP + T5,
Qwen3), only tiny. Nothing is downloaded: the tokenizers are written by hand (a
byte-level BPE vocabulary without merges for CLIP and Qwen, a character unigram
vocabulary for T5; Qwen's chat template is a short stand-in of Qwen3's).

The schedulers carry the real models' settings, except FLUX.1-dev's token-count
anchors: base_image_seq_len / max_image_seq_len are 16 / 256 here (256 / 4096 in
the real config) so that the tiny test resolutions (8x8 and 16x16 latents: 16
and 64 tokens) get clearly different shifts.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Optional

import torch

from integration.tiny_models import _bytes_to_unicode
from tiny_pipelines import _clip, write_tokenizer

FLUX_DEV_SCHEDULER = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 16,
    "max_image_seq_len": 256,
}
FLUX_SCHNELL_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}
ZIMAGE_TURBO_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": False}

QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def flow_vae(seed: int = 0):
    """The FLUX / Z-Image VAE's layout (16 latent channels, scaling and shift factors, no
    quant convs), 4x downsampling instead of 8."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.printable if not c.isspace()]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def t5_encoder(vocab_size: int, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    )


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for token in specials:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def qwen3(vocab_size: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
    )
    return Qwen3ForCausalLM(config)


def _as_loaded(pipe):
    """Modules in eval mode, as from_pretrained leaves them (T5 has dropout)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def make_flux_pipeline(variant: str = "dev", folder: Optional[Path] = None, seed: int = 0):
    """A tiny FluxPipeline: `dev` with the guidance embedding, `schnell` without.
    Saved to `folder` when given (a real pipeline folder)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer

    if variant not in ("dev", "schnell"):
        raise ValueError(variant)
    tok_dir = Path(folder).parent / f".{Path(folder).name}-clip" if folder else Path("/tmp") / f"adt-tiny-clip-{seed}"
    write_tokenizer(tok_dir)
    t5_tok = t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=32,
        guidance_embeds=variant == "dev",
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if variant == "dev" else FLUX_SCHNELL_SCHEDULER))
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=flow_vae(seed),
        text_encoder=_clip(False, seed=seed),
        tokenizer=CLIPTokenizer.from_pretrained(str(tok_dir)),
        text_encoder_2=t5_encoder(len(t5_tok), seed=seed),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    if folder is not None:
        pipe.save_pretrained(str(folder))
    return _as_loaded(pipe)


def make_zimage_pipeline(folder: Optional[Path] = None, seed: int = 0):
    """A tiny ZImagePipeline with Z-Image-Turbo's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tok = qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[1024, 64, 64],
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_TURBO_SCHEDULER),
        vae=flow_vae(seed),
        text_encoder=qwen3(len(tok), seed=seed),
        tokenizer=tok,
        transformer=transformer,
    )
    if folder is not None:
        pipe.save_pretrained(str(folder))
    return _as_loaded(pipe)


__all__ = ["make_flux_pipeline", "make_zimage_pipeline", "flow_vae", "qwen_tokenizer", "t5_tokenizer"]
