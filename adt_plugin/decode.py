"""Latents -> pixels for the discriminator, through a frozen VAE (gradients allowed).

Works with diffusers' AutoencoderKL (SD1.x/SDXL/SD3: `latents / scaling_factor +
shift_factor`) and AutoencoderTiny (TAESD / TAESDXL / TAESD3: trained on the
scaled latents, its config has scaling 1 and no shift), a much cheaper decoder
for the generator's backward pass.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class LatentDecoder(nn.Module):
    def __init__(
        self,
        vae: nn.Module,
        scaling_factor: Optional[float] = None,
        shift_factor: Optional[float] = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        config = getattr(vae, "config", {})
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else getattr(config, "scaling_factor", 1.0))
        shift = shift_factor if shift_factor is not None else getattr(config, "shift_factor", None)
        self.shift_factor = float(shift or 0.0)
        if gradient_checkpointing and hasattr(vae, "enable_gradient_checkpointing"):
            vae.enable_gradient_checkpointing()

    def train(self, mode: bool = True):  # frozen: stays in eval mode
        return super().train(False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        z = latents.to(dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample


def locate_tiny_decoder(path_or_name: str, setting: str = "decoder_path"):
    """Where decoder_path would come from (a folder, the Hugging Face cache, or a download)."""
    from . import hub

    return hub.locate(path_or_name, what="tiny autoencoder (decoder_path)", setting=setting, example="madebyollin/taesd")


def load_tiny_decoder(path_or_name: str, device=None) -> LatentDecoder:
    """A tiny autoencoder's decoder (diffusers `AutoencoderTiny`) from a local folder or a
    Hugging Face hub id: madebyollin/taesd for SD1.x/2.x, madebyollin/taesdxl for SDXL,
    madebyollin/taesd3 for SD3 (downloaded once into the cache when online)."""
    from diffusers import AutoencoderTiny

    from .hub import ModelNotFound, not_loadable_message

    source = locate_tiny_decoder(path_or_name)
    try:
        vae = AutoencoderTiny.from_pretrained(source.load_name, **source.pretrained_kwargs())
    except (OSError, ValueError) as err:
        raise ModelNotFound(not_loadable_message(source, err)) from err
    return LatentDecoder(vae).to(device)
