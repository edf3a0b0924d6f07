"""Losses: hinge (Eq. 8, 9) and the diffusion loss.

Scores are lists, one tensor per discriminator tap, shaped [B] (siamese) or
[B, N] (per-token logits); each tap's hinge is averaged over all its entries and
the taps are summed, as Eq. 9 sums over i.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def hinge_d_loss(real_scores: Sequence[torch.Tensor], fake_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_D = sum_i E[relu(1 - D_i(x0))] + E[relu(1 + D_i(x_hat))]."""
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real_scores, fake_scores))


def hinge_g_loss(fake_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_G_adv = -sum_i E[D_i(x_hat)]."""
    return -sum(f.mean() for f in fake_scores)


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32, the reduction every SD trainer uses."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
