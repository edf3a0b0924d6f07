"""Distances between two sets of image features: Fréchet distance and KID.

Both are plain torch in float64 and take feature matrices [N, D], so the same
code serves every feature network (FID-Inception pool3, DINOv2 CLS, ...).

Fréchet distance (Heusel et al. 2017) between Gaussians fitted to the sets:

    FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr( (S_1 S_2)^(1/2) )

tr((S_1 S_2)^(1/2)) equals the sum of the square roots of the eigenvalues of
S_1^(1/2) S_2 S_1^(1/2), which is symmetric positive semi-definite; that route
needs only `eigh` and stays real even when a small set makes S singular.

KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / D + 1)^3, averaged over random subsets (seeded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set (float64)."""

    mean: torch.Tensor  # [D]
    cov: torch.Tensor  # [D, D]
    count: int

    @classmethod
    def of(cls, features: torch.Tensor) -> "GaussianStats":
        x = _as_matrix(features)
        if x.shape[0] < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 images per set, got {x.shape[0]}")
        mean = x.mean(dim=0)
        centered = x - mean
        cov = centered.T @ centered / (x.shape[0] - 1)
        return cls(mean, cov, x.shape[0])


def _as_matrix(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    return features.detach().to(torch.float64).cpu()


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    root_a = _psd_sqrt(a.cov)
    middle = root_a @ b.cov @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = a.mean - b.mean
    return float(diff @ diff + torch.trace(a.cov) + torch.trace(b.cov) - 2 * trace_sqrt)


def frechet_distance_of(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    return frechet_distance(GaussianStats.of(features_a), GaussianStats.of(features_b))


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3."""
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    sum_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    sum_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return sum_xx + sum_yy - 2 * k_xy.mean()


@dataclass(frozen=True)
class KidResult:
    mean: float
    std: float
    subsets: int
    subset_size: int


def kernel_inception_distance(
    features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> KidResult:
    """KID between two feature sets; each subset draws `subset_size` rows (without
    replacement) from each set, shrunk to the smaller set's size when needed."""
    x, y = _as_matrix(features_a), _as_matrix(features_b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {x.shape[0]} and {y.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    values = torch.stack(
        [
            _polynomial_mmd2(
                x[torch.randperm(x.shape[0], generator=generator)[:size]],
                y[torch.randperm(y.shape[0], generator=generator)[:size]],
            )
            for _ in range(subsets)
        ]
    )
    std = float(values.std()) if subsets > 1 else 0.0
    return KidResult(float(values.mean()), std, subsets, size)
