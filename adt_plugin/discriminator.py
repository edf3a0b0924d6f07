"""Discriminators on a frozen feature network (paper Sec. 3.1, Appendix A.2).

SiameseDiscriminator (ADT, Eq. 6): for each tap i a trainable head h_i, an EMA twin
h'_i (no gradient; phi' <- tau phi' + (1 - tau) phi), and a predictor g_i on the
generated branch. The score of an image x against the real reference x0 is

    D_i(x) = cos( g_i(h_i(F_i(aug(x)))), h'_i(F_i(aug'(x0))) )      in [-1, 1].

ProjectedDiscriminator (the paper's "+StyleGAN" ablation, StyleGAN-T style): the
same backbone and heads, then a plain per-token logit; no twins, no reference.

Both take pixels in [-1, 1]; augmentation, resizing to the backbone's input size
and normalisation happen inside torch, so gradients reach the pixels.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .augment import diff_augment, parse_policy

DISCRIMINATOR_KINDS = ("siamese", "projected")


@dataclass(frozen=True)
class DiscriminatorConfig:
    """The discriminator's part of `AdtSettings` (`AdtSettings.discriminator_config()`;
    the defaults live there: `discriminator`, `backbone_path`, `taps`,
    `head_channels`, `tau`, `augment`, `pool`)."""

    kind: str
    backbone_path: str
    taps: tuple[int, ...]
    channels: int
    tau: float
    augment: str
    # How a head's token map becomes the vector z of Eq. 6: "flatten" (the whole
    # map, position by position) or "mean" (average over tokens first; insensitive
    # to where things are, a weaker reference constraint).
    pool: str

    def __post_init__(self):
        if self.channels < 1:
            raise ValueError(f"head_channels must be >= 1, got {self.channels}")
        if self.kind not in DISCRIMINATOR_KINDS:
            raise ValueError(f"discriminator kind must be one of {DISCRIMINATOR_KINDS}, got {self.kind!r}")
        if self.pool not in ("flatten", "mean"):
            raise ValueError(f"pool must be 'flatten' or 'mean', got {self.pool!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        parse_policy(self.augment)

    def to_dict(self) -> dict:
        return asdict(self)


def _block(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm1d(cout), nn.LeakyReLU(0.2))


class DiscHead(nn.Module):
    """Light head on one tap's tokens [B, C, N] -> [B, channels, N] (StyleGAN-T layout:
    a 1x1 projection, then a residual kernel-9 block; convs + batch norm)."""

    def __init__(self, in_channels: int, channels: int = 64):
        super().__init__()
        self.proj = _block(in_channels, channels, 1)
        self.res = _block(channels, channels, 9)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.proj(tokens)
        return (h + self.res(h)) / math.sqrt(2)


class _FeatureDiscriminator(nn.Module):
    def __init__(self, backbone: nn.Module, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.policy = parse_policy(config.augment)
        self.heads = nn.ModuleList(DiscHead(c, config.channels) for c in backbone.feature_channels)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, -1, 1, 1), persistent=False)

    @property
    def backbone_identity(self) -> str:
        return getattr(self.backbone, "identity", type(self.backbone).__name__)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith(("backbone.", "twins."))]

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone (it is loaded from its own path)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def features(self, pixels: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """Backbone token maps of augmented, resized, normalised pixels (graph kept if any)."""
        x = diff_augment(pixels, self.policy, generator) if self.policy else pixels
        x = (x + 1) / 2
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        size = self.backbone.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Score without building gradients for the discriminator (generator pass)."""
        params = self.trainable_parameters()
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def update_twins(self) -> None:  # no twins by default
        pass


class SiameseDiscriminator(_FeatureDiscriminator):
    needs_reference = True

    def __init__(self, backbone: nn.Module, config: DiscriminatorConfig):
        super().__init__(backbone, config)
        self.predictors = nn.ModuleList(DiscHead(config.channels, config.channels) for _ in self.heads)
        self.twins = copy.deepcopy(self.heads)
        self.twins.requires_grad_(False)

    def _vector(self, z: torch.Tensor) -> torch.Tensor:
        return z.flatten(1) if self.config.pool == "flatten" else z.mean(dim=2)

    def reference(self, real_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """z_R = h'_i(F_i(aug'(x0))): the twins' embedding of the reference, never with a graph."""
        with torch.no_grad():
            return [self._vector(twin(f)) for twin, f in zip(self.twins, real_features)]

    def scores(self, features: Sequence[torch.Tensor], reference: Optional[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """D_i per sample, shape [B] for each tap (Eq. 6)."""
        if reference is None:
            raise ValueError("the siamese discriminator scores an image against a reference; pass reference=")
        out = []
        for head, pred, f, z_ref in zip(self.heads, self.predictors, features, reference):
            z = self._vector(pred(head(f)))
            out.append(F.cosine_similarity(z.float(), z_ref.float(), dim=1, eps=1e-8))
        return out

    @torch.no_grad()
    def update_twins(self) -> None:
        """phi' <- tau phi' + (1 - tau) phi, parameters and batch-norm statistics alike."""
        tau = self.config.tau
        for twin, head in zip(self.twins, self.heads):
            head_state = head.state_dict()
            for name, value in twin.state_dict().items():
                if value.is_floating_point():
                    value.mul_(tau).add_(head_state[name], alpha=1 - tau)
                else:
                    value.copy_(head_state[name])


class ProjectedDiscriminator(_FeatureDiscriminator):
    """StyleGAN-T style: per-token real/fake logits from each head."""

    needs_reference = False

    def __init__(self, backbone: nn.Module, config: DiscriminatorConfig):
        super().__init__(backbone, config)
        self.logits = nn.ModuleList(nn.Conv1d(config.channels, 1, 1) for _ in self.heads)

    def reference(self, real_features: Sequence[torch.Tensor]) -> None:
        return None

    def scores(self, features: Sequence[torch.Tensor], reference=None) -> list[torch.Tensor]:
        """Per-token logits [B, N] for each tap."""
        return [logit(head(f)).squeeze(1).float() for head, logit, f in zip(self.heads, self.logits, features)]


def build_discriminator(backbone: nn.Module, config: DiscriminatorConfig) -> _FeatureDiscriminator:
    cls = SiameseDiscriminator if config.kind == "siamese" else ProjectedDiscriminator
    return cls(backbone, config)


Discriminator = _FeatureDiscriminator
__all__ = [
    "DiscriminatorConfig",
    "DiscHead",
    "Discriminator",
    "SiameseDiscriminator",
    "ProjectedDiscriminator",
    "build_discriminator",
]
