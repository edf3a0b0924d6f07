"""Frozen feature networks for the discriminator.

Any frozen `nn.Module` works as a backbone if it maps preprocessed images to a
list of token maps [B, C_i, N_i] (one per tap) and says how to preprocess:
`input_size`, `mean`, `std`, `feature_channels`, and an `identity` string that
discriminator checkpoints record. The default is DINOv2 ViT-S/14 through
transformers' `Dinov2Model`, tapped after blocks [2, 5, 8, 11], named by a local
folder or a Hugging Face hub id (`hub.py`: the cache, or one download when online).
`locate_dinov2` and `backbone_depth` answer where it comes from and how deep it is
without loading weights (the front ends' early check); `load_dinov2` loads it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import hub
from .hub import ModelNotFound, ModelSource

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
        check_taps(taps, depth)
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


def check_taps(taps: Sequence[int], depth: int, name: str = "this model") -> None:
    """Taps index DINOv2's transformer blocks: 0..depth-1."""
    bad = [t for t in taps if not 0 <= int(t) < depth]
    if bad:
        raise ValueError(f"taps {bad} are outside {name}'s {depth} blocks (0..{depth - 1})")


def locate_dinov2(path_or_name: str = DEFAULT_DINOV2, setting: str = "backbone_path") -> ModelSource:
    """Where the backbone would come from (a folder, the Hugging Face cache, or a download), from the disk alone."""
    return hub.locate(path_or_name, what="DINOv2 backbone", setting=setting, example=DEFAULT_DINOV2)


def backbone_depth(source: ModelSource) -> int:
    """The number of transformer blocks, from config.json alone (no weights)."""
    config = source.config()
    depth, width = config.get("num_hidden_layers"), config.get("hidden_size")
    if not isinstance(depth, int) or not isinstance(width, int):
        raise ModelNotFound(
            f"{source.what} {source.name!r}: its config.json has no num_hidden_layers / hidden_size; "
            f"a DINOv2 (transformers Dinov2Model) is needed, e.g. {DEFAULT_DINOV2}"
        )
    return depth


def load_dinov2(path_or_name: str = DEFAULT_DINOV2, taps: Sequence[int] = DEFAULT_TAPS, input_size: int = 224) -> Dinov2Backbone:
    """DINOv2 from a local folder or a Hugging Face hub id: the cache, or one download
    into it when online (as transformers' from_pretrained; HF_HUB_OFFLINE=1 keeps it local)."""
    from transformers import AutoConfig, AutoModel, Dinov2Model

    source = locate_dinov2(path_or_name)
    try:
        config = AutoConfig.from_pretrained(source.load_name, **source.pretrained_kwargs())
        # Dinov2Model directly: AutoModel with a config imports every model class's config to
        # look it up (transformers 4.5x), and one with a broken optional dependency (Gemma3n
        # needs timm, timm needs torchvision) stops the run.
        model_class = Dinov2Model if config.model_type == "dinov2" else AutoModel
        model = model_class.from_pretrained(source.load_name, config=config, **source.pretrained_kwargs())
    except (OSError, ValueError) as err:
        raise ModelNotFound(hub.not_loadable_message(source, err)) from err
    identity = f"dinov2:{config.hidden_size}x{config.num_hidden_layers}"
    return Dinov2Backbone(model, taps=taps, input_size=input_size, identity=identity)
