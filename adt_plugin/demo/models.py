"""The demo's three small networks and the adapter that plugs the denoiser into the core.

- the denoiser: diffusers' `UNet2DModel` on 8x8 pixels with a class embedding
  (10 digits + 1 "no label" index for classifier-free guidance), epsilon
  prediction and Stable Diffusion 1.x's noise schedule (scaled linear betas
  0.00085..0.012), with "trailing" timestep spacing so that a 4-step sampler
  starts at t = 999 rather than t = 751;
- `DigitFeatureNet`: a small CNN trained once to classify the *base* split, then
  frozen. It is the discriminator's backbone here, in the FeatureNetwork shape of
  `adt_plugin.backbones` (token maps [B, C, N] per tap), standing where DINOv2
  stands for Stable Diffusion;
- `DigitClassifier`: an MLP trained on base + target-train digits, used only for
  the metrics (class accuracy, Frechet distance in its features). It is a
  different network from the discriminator's backbone, so ADT cannot score well
  by fooling the very features it is measured in.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..adapter import Cond
from ..backbones import FeatureNetwork
from .data import NUM_CLASSES

NULL_LABEL = NUM_CLASSES  # the class-embedding index meaning "no label" (CFG's unconditional branch)

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "timestep_spacing": "trailing",
    "set_alpha_to_one": True,
    "steps_offset": 0,
}


def build_unet(widths: tuple[int, ...] = (16, 32)) -> nn.Module:
    from diffusers import UNet2DModel

    blocks = ("DownBlock2D",) * len(widths)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(widths),
        layers_per_block=1,
        down_block_types=blocks,
        up_block_types=("UpBlock2D",) * len(widths),
        num_class_embeds=NUM_CLASSES + 1,
        norm_num_groups=8,
        add_attention=False,  # no attention on a 2x2 map: 10 % faster, no loss
    )


class DigitsAdapter:
    """The core's ModelAdapter for the digits UNet: pixels are the latents, so
    `decode` is the identity (differentiable, as the protocol asks)."""

    scheduler_config: Mapping[str, Any] = SCHEDULER_CONFIG

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.unet(sample, timestep, class_labels=cond["labels"]).sample

    def uncond(self, cond: Cond) -> Cond:
        return {"labels": torch.full_like(cond["labels"], NULL_LABEL)}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class DigitFeatureNet(FeatureNetwork):
    """Two conv stages on 8x8 digits; taps after each: [B, 32, 64] and [B, 64, 16].

    Pixels reach it through the discriminator as ((x + 1) / 2 - mean) / std, so
    mean = std = 0.5 gives it the images back in [-1, 1]."""

    def __init__(self, identity: str = "digits-cnn"):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1), nn.GELU())
        self.stage2 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU())
        self.classify = nn.Linear(64, NUM_CLASSES)  # only for its training
        self.input_size = 8
        self.mean, self.std = (0.5,), (0.5,)
        self.feature_channels = [32, 64]
        self.identity = identity

    def stages(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = self.stage1(images)
        return h1, self.stage2(h1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [h.flatten(2) for h in self.stages(images)]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.stages(images)[1].mean(dim=(2, 3)))


class DigitClassifier(nn.Module):
    """MLP on the 64 pixels; `features` (128-d) are what the feature FD measures."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 128), nn.GELU())
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
