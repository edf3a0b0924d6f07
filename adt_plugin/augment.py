"""Differentiable augmentation (DiffAugment, Zhao et al. 2020): color, translation, cutout.

Applied to both discriminator branches. Every op is differentiable w.r.t. the
pixels, so the adversarial gradient reaches the generator through it. Random
parameters come from an explicit generator (drawn on the CPU, then moved), so a
resumed run draws the same augmentations as an uninterrupted one.
Images are in [-1, 1], shape [B, C, H, W].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")


def _rand(generator: torch.Generator, like: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=generator).to(device=like.device, dtype=like.dtype)


def color(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_rand(generator, x, b, 1, 1, 1) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(generator, x, b, 1, 1, 1) * 2) + mean  # saturation
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand(generator, x, b, 1, 1, 1) + 0.5) + mean  # contrast


def translation(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to `ratio` of its size, filling with zeros."""
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (b, 1, 1), generator=generator).to(x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (b, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + dy + 1
    cols = torch.arange(w, device=x.device).view(1, 1, w) + dx + 1
    padded = F.pad(x, [1, 1, 1, 1])  # one ring of zeros; out-of-range indices clamp onto it
    rows = rows.clamp(0, h + 1).expand(b, h, w)
    cols = cols.clamp(0, w + 1).expand(b, h, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of `ratio` x the image size at a random centre."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), generator=generator).to(x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows - cy).abs() * 2 < ch) & ((cols - cx).abs() * 2 < cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_OPS = {"color": color, "translation": translation, "cutout": cutout}


def parse_policy(policy: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in _OPS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown}; choose from {', '.join(POLICIES)}")
    return names


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    for name in policy:
        x = _OPS[name](x, generator)
    return x
