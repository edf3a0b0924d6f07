"""Sampling with the real sampler, and the demo's metrics.

Samples come from the core's own `Rollout` started at pure noise (the same
scheduler code, guidance and step that ADT trains through), so "the sampler
settings trained for" means exactly the same thing in training and evaluation.

Metrics against the held-out target test set:
- `fd_pixel`: Frechet distance between Gaussians fitted to the raw 64 pixels;
- `fd_feature`: the same in the 128-d features of the separate metric classifier;
- `accuracy`: the share of samples the classifier reads as the digit they were
  asked for;
- `diff_loss`: the held-out diffusion loss (epsilon MSE over fixed timesteps and
  noises), which says whether the denoiser itself got worse as a denoiser.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from ..adapter import ModelAdapter
from ..losses import diffusion_loss
from ..noise import NoiseSchedule
from ..rollout import Rollout
from ..settings import AdtSettings


@dataclass(frozen=True)
class SamplerSetting:
    sampler: str = "ddim"
    steps: int = 4
    cfg: float = 2.0

    @property
    def label(self) -> str:
        return f"{self.sampler} {self.steps} steps, cfg {self.cfg:g}"

    @property
    def key(self) -> str:
        return f"{self.sampler}-{self.steps}-cfg{self.cfg:g}"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of Gaussians fitted to rows.

    The trace of the matrix square root is taken as the sum of the square roots
    of the eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric PSD, so eigh is exact
    and stable, unlike a general sqrtm)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] arrays of the same D, got {a.shape} and {b.shape}")
    with _one_blas_thread():
        return _frechet(a, b)


def _one_blas_thread():
    """Matrices this small gain nothing from BLAS threads, and on a busy machine
    OpenBLAS's spinning threads make each call 20x slower."""
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=1, user_api="blas")
    except Exception:  # noqa: BLE001 - without threadpoolctl the result is the same, only slower
        return contextlib.nullcontext()


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)


@torch.no_grad()
def generate(model: ModelAdapter, labels: torch.Tensor, setting: SamplerSetting, seed: int) -> torch.Tensor:
    """Samples for `labels` from pure noise, with the core's rollout (no graph)."""
    config = AdtSettings(
        sampler=setting.sampler, num_inference_steps=setting.steps, guidance_scale=setting.cfg, grad_mode="off"
    ).rollout_config()
    rollout = Rollout(model.scheduler_config, config)
    plan = rollout.plan(torch.Generator(), num_steps=rollout.schedule_length)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), 1, 8, 8), generator=gen) * float(rollout.template.init_noise_sigma)
    return rollout.run(model, noise, {"labels": labels}, plan, grad_mode="off").sample.clamp(-1, 1)


@torch.no_grad()
def heldout_diffusion_loss(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, draws: int = 4, seed: int = 1234) -> float:
    """Mean epsilon MSE on the held-out set over `draws` fixed (timestep, noise) pairs per image."""
    schedule = NoiseSchedule(model.scheduler_config)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        t = schedule.sample_timesteps(len(y), gen)
        noise = torch.randn(x.shape, generator=gen)
        pred = model.denoise(schedule.add_noise(x, noise, t), t, {"labels": y})
        total += float(diffusion_loss(pred, schedule.target(x, noise, t)))
    return total / draws


class Evaluator:
    """Scores samples against the held-out target set; reference statistics are computed once."""

    def __init__(self, classifier: torch.nn.Module, test_x: torch.Tensor, test_y: torch.Tensor):
        self.classifier = classifier
        self.test_x, self.test_y = test_x, test_y
        with torch.no_grad():
            self.ref_pixels = test_x.flatten(1).numpy()
            self.ref_features = classifier.features(test_x).numpy()

    @torch.no_grad()
    def score_samples(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        feats = self.classifier.features(samples)
        acc = float((self.classifier.head(feats).argmax(1) == labels).float().mean())
        return {
            "fd_pixel": frechet_distance(samples.flatten(1).numpy(), self.ref_pixels),
            "fd_feature": frechet_distance(feats.numpy(), self.ref_features),
            "accuracy": acc,
        }

    def evaluate(self, model: ModelAdapter, setting: SamplerSetting, seed: int) -> tuple[dict[str, float], torch.Tensor]:
        """Metrics of one batch of samples (one per held-out image, same labels), and the samples."""
        samples = generate(model, self.test_y, setting, seed)
        return self.score_samples(samples, self.test_y), samples

    def diffusion_loss(self, model: ModelAdapter) -> float:
        return heldout_diffusion_loss(model, self.test_x, self.test_y)
