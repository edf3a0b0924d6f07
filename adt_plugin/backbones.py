"""Frozen feature networks for the discriminator.

Any frozen `nn.Module` works as a backbone if it maps preprocessed images to a
list of token maps [B, C_i, N_i] (one per tap) and says how to preprocess:
`input_size`, `mean`, `std`, `feature_channels`, and an `identity` string that
discriminator checkpoints record. The default is DINOv2 ViT-S/14 through
transformers' `Dinov2Model`, tapped after blocks [2, 5, 8, 11].
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_DINOV2 = "facebook/dinov2-small"
DEFAULT_TAPS = (2, 5, 8, 11)


class FeatureNetwork(nn.Module):
    """Base class for frozen backbones (a documented shape, not a requirement)."""

    input_size: int
    mean: Sequence[float]
    std: Sequence[float]
    feature_channels: list[int]
    identity: str

    def freeze(self) -> "FeatureNetwork":
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True):  # a frozen backbone stays in eval mode
        return super().train(False)


class Dinov2Backbone(FeatureNetwork):
    """DINOv2 patch tokens after the chosen transformer blocks.

    `hidden_states[0]` is the embedding output, so block i is `hidden_states[i + 1]`;
    the CLS (and register) tokens are dropped."""

    def __init__(self, model: nn.Module, taps: Sequence[int] = DEFAULT_TAPS, input_size: int = 224, identity: str = ""):
        super().__init__()
        depth = model.config.num_hidden_layers
        bad = [t for t in taps if not 0 <= t < depth]
        if bad:
            raise ValueError(f"DINOv2 taps {bad} are outside this model's {depth} blocks (0..{depth - 1})")
        self.model = model
        self.taps = tuple(int(t) for t in taps)
        self.input_size = input_size
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.feature_channels = [model.config.hidden_size] * len(self.taps)
        self.prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        self.identity = identity or f"dinov2(hidden={model.config.hidden_size},layers={depth})"
        self.freeze()

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = self.model(pixel_values=images, output_hidden_states=True)
        hidden = out.hidden_states
        return [hidden[t + 1][:, self.prefix_tokens :, :].transpose(1, 2) for t in self.taps]


def load_dinov2(path_or_name: str = DEFAULT_DINOV2, taps: Sequence[int] = DEFAULT_TAPS, input_size: int = 224) -> Dinov2Backbone:
    """Load DINOv2 from a local folder or from the local Hugging Face cache (never the network)."""
    from transformers import AutoConfig, AutoModel

    local = Path(os.path.expanduser(path_or_name))
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else path_or_name, local_files_only=True)
        model = AutoModel.from_pretrained(str(local) if local.exists() else path_or_name, config=config, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"DINOv2 backbone not found at {path_or_name!r} (looked for a local folder and the local Hugging Face "
            f"cache; nothing is downloaded at run time). Get it once on a machine with internet, e.g. "
            f"`huggingface-cli download {DEFAULT_DINOV2} --local-dir ./dinov2-small`, then set the backbone path "
            f"to that folder. ({err.__class__.__name__}: {err})"
        ) from err
    identity = f"dinov2:{config.hidden_size}x{config.num_hidden_layers}"
    return Dinov2Backbone(model, taps=taps, input_size=input_size, identity=identity)


def dinov2_is_available(path_or_name: str = DEFAULT_DINOV2) -> tuple[bool, str]:
    """(found, where) without loading weights: for `adt doctor`."""
    local = Path(os.path.expanduser(path_or_name))
    if local.exists():
        ok = (local / "config.json").exists()
        return ok, str(local) if ok else f"{local} (no config.json)"
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(path_or_name, "config.json")
        if isinstance(hit, str):
            return True, f"HF cache: {hit}"
    except Exception:  # noqa: BLE001 - a broken hub install only means "not found"
        pass
    return False, f"{path_or_name} (not a folder, not in the local HF cache)"
