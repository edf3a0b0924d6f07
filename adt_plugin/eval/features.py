"""Feature networks for set distances (FD, KID): FID-Inception and DINOv2.

A feature network here is a callable: list (or batch) of [3, H, W] images in
[0, 1] -> [B, D] float features, with a `description` that states the network
and the resize (printed next to every number it produces).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

from ..backbones import IMAGENET_MEAN, IMAGENET_STD
from .images import normalize, prepare_each, resize


class InceptionFeatures:
    def __init__(self, net: torch.nn.Module):
        self.net = net
        self.description = getattr(net, "description", "FID Inception")

    @torch.no_grad()
    def __call__(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        # pytorch-fid resizes inside the network; per image, so mixed sizes are fine
        batch = prepare_each(
            images, lambda x: F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        )
        return self.net(batch.to(device)).float().cpu()


class Dinov2Features:
    """CLS token after the final layer norm (transformers' `pooler_output`), as
    FD-DINOv2 (Stein et al. 2023) uses; images resized to `input_size`."""

    def __init__(self, model: torch.nn.Module, name: str = "dinov2", input_size: int = 224):
        self.model = model.eval().requires_grad_(False)
        self.input_size = input_size
        self.description = (
            f"DINOv2 ({name}) CLS token after layer norm; RGB [0,1] -> bicubic antialiased resize to "
            f"{input_size}x{input_size} (torch) -> ImageNet mean/std"
        )

    @torch.no_grad()
    def __call__(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = prepare_each(images, lambda x: resize(x.float(), self.input_size))
        pixels = normalize(batch, IMAGENET_MEAN, IMAGENET_STD).to(device)
        out = self.model(pixel_values=pixels)
        return out.pooler_output.float().cpu()


def load_dinov2_features(path: str | os.PathLike, device=None, input_size: int = 224) -> Dinov2Features:
    """DINOv2 from a local folder or a hub id (the same loader the discriminator uses)."""
    from ..backbones import load_dinov2
    from ..hub import display_name
    from .weights import WeightsNotFound, missing_message

    try:
        backbone = load_dinov2(str(path), taps=(0,))
    except FileNotFoundError as err:
        raise WeightsNotFound(f"{err}. {missing_message('dinov2')}") from None
    return Dinov2Features(backbone.model.to(device), name=display_name(os.path.normpath(str(path))), input_size=input_size)
