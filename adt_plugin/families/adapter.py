"""The core's ModelAdapter over a diffusers denoiser of one family.

The family says how the denoiser is called (packing, ids, guidance input, the
transformer's own time and sign conventions) and how the unconditional batch is
built; this class only adds the precision rules every front end shares.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Mapping, Optional

import torch

from ..adapter import Cond
from .base import ModelFamily


class FamilyAdapter:
    def __init__(
        self,
        family: ModelFamily,
        denoiser: torch.nn.Module,
        scheduler_config: Mapping[str, Any],
        empty_text: Mapping[str, torch.Tensor],
        decoder: Callable[[torch.Tensor], torch.Tensor],
        autocast: Callable[[], ContextManager] = nullcontext,
    ):
        self.family = family
        self.denoiser = denoiser
        self.scheduler_config = scheduler_config
        self.empty_text = dict(empty_text)
        self.decoder = decoder
        self.autocast = autocast

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        with self.autocast():
            out = self.family.denoise(self.denoiser, sample, timestep, cond)
        return out.to(sample.dtype)  # the sampler's arithmetic stays in the latents' precision

    def uncond(self, cond: Cond) -> dict[str, Optional[torch.Tensor]]:
        return self.family.uncond(cond, self.empty_text)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # No autocast: the VAE runs in its own dtype (float32 for SDXL under fp16, where
        # its activations overflow); LatentDecoder casts the latents to it.
        return self.decoder(latents).float()


__all__ = ["FamilyAdapter"]
