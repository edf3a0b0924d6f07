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


def load_tiny_decoder(path: str, device=None) -> LatentDecoder:
    """A tiny autoencoder's decoder from a local diffusers `AutoencoderTiny` folder
    (TAESD for SD1.x/2.x, TAESDXL for SDXL, TAESD3 for SD3)."""
    import os
    from pathlib import Path

    from diffusers import AutoencoderTiny

    folder = Path(os.path.expanduser(path))
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"decoder_path {folder} is not a diffusers AutoencoderTiny folder (config.json + weights); nothing is "
            f"downloaded at run time. Get one once, e.g. `huggingface-cli download madebyollin/taesd --local-dir "
            f"./taesd` (madebyollin/taesdxl for SDXL, madebyollin/taesd3 for SD3), or leave decoder_path empty to "
            f"decode with the model's VAE."
        )
    return LatentDecoder(AutoencoderTiny.from_pretrained(str(folder), local_files_only=True)).to(device)
