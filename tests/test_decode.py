"""Latent decoding for the discriminator: frozen VAE / tiny autoencoder, gradients reach latents."""

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from adt_plugin.decode import LatentDecoder


def tiny_kl(**kw):
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, layers_per_block=1, **kw,
    )


def test_vae_decoder_unscales_shifts_and_passes_gradients():
    vae = tiny_kl(scaling_factor=0.5, shift_factor=0.25)
    decoder = LatentDecoder(vae)
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    pixels = decoder(latents)
    assert pixels.shape == (2, 3, 16, 16)
    torch.testing.assert_close(pixels, vae.decode(latents / 0.5 + 0.25).sample)
    pixels.sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in vae.parameters())
    decoder.train()
    assert not vae.training  # frozen decoder stays in eval mode


def test_tiny_autoencoder_takes_scaled_latents_as_they_are():
    torch.manual_seed(0)
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4,
    )
    decoder = LatentDecoder(taesd)
    assert decoder.scaling_factor == 1.0 and decoder.shift_factor == 0.0
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    out = decoder(latents)
    torch.testing.assert_close(out, taesd.decode(latents).sample)
    out.mean().backward()
    assert latents.grad.abs().sum() > 0
