"""The forward (noising) process and the prediction targets, for both model families.

Noise-prediction models (SD1.x/2.x, SDXL):  x_t = alpha_t x0 + sigma_t eps,
    alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]);
    target eps ("epsilon") or v = alpha_t eps - sigma_t x0 ("v_prediction").
Flow-matching models (SD3, FLUX, Z-Image):  x_t = (1 - s) x0 + s eps with s = t / T;
    target velocity eps - x0 ("flow").

Flow training timesteps are warped by the family's shift, which for FLUX.1-dev
depends on the latent size as its inference schedule does (`ModelFamily.train_shift`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .families import ModelFamily, family_for_scheduler
from .samplers import is_flow_config

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def prediction_type_of(scheduler_config: Mapping[str, Any]) -> str:
    if is_flow_config(scheduler_config):
        return "flow"
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {kind!r} in the model's scheduler config; expected epsilon or v_prediction")
    return kind


def prediction_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """What the denoiser is trained to output at noise level (alpha, sigma)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0
    if prediction_type == "flow":
        return noise - x0
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def _bcast(value, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim)) if value.ndim else value


class NoiseSchedule:
    """The model's training-time forward process, built from its scheduler config."""

    def __init__(self, scheduler_config: Mapping[str, Any], family: Optional[ModelFamily] = None):
        self.config = dict(scheduler_config)
        self.family = family or family_for_scheduler(scheduler_config)
        self.prediction_type = prediction_type_of(scheduler_config)
        self.num_train_timesteps = int(self.config.get("num_train_timesteps", 1000))
        self.flow = self.prediction_type == "flow"
        self.shift = float(self.config.get("shift", 1.0))
        if not self.flow:
            ddpm = DDPMScheduler.from_config({k: v for k, v in self.config.items() if not k.startswith("_")})
            self.alphas_cumprod = ddpm.alphas_cumprod.to(torch.float64)

    def alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = timesteps.to(torch.float64).cpu()
        if self.flow:
            s = t / self.num_train_timesteps
            return (1 - s).float(), s.float()
        # Linear interpolation covers the float timesteps of Karras-type schedules.
        t = t.clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        ac = (1 - w) * self.alphas_cumprod[lo] + w * self.alphas_cumprod[hi]
        return ac.sqrt().float(), (1 - ac).sqrt().float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(timesteps)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(timesteps)
        return prediction_target(self.prediction_type, x0, noise, alpha, sigma)

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator,
        weighting: str = "uniform",
        latent_size: Optional[tuple[int, int]] = None,
    ) -> torch.Tensor:
        """Training timesteps: uniform integers for noise-prediction models; for flow
        models s = shift-warped uniform or logit-normal, returned as t = s * T, with
        the family's shift for a latent of `latent_size` (h, w) where it depends on it."""
        if not self.flow:
            return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator)
        if weighting == "logit_normal":
            u = torch.sigmoid(torch.randn(batch_size, generator=generator))
        elif weighting == "uniform":
            u = torch.rand(batch_size, generator=generator)
        else:
            raise ValueError(f"unknown timestep weighting {weighting!r}; expected uniform or logit_normal")
        shift = self.family.train_shift(self.config, latent_size) if latent_size is not None else self.shift
        s = shift * u / (1 + (shift - 1) * u)
        return s * self.num_train_timesteps


def start_levels(scheduler: SchedulerMixin, begin_index: int, prediction_type: str) -> tuple[float, float]:
    """(alpha, sigma) of the denoiser's input at the rollout's first step.

    Read from the sampler itself so that the diffusion target at t_s matches the
    x_ts the sampler built: DDIM from alphas_cumprod[t]; sigma-parameterised
    schedulers (Euler, DPM-Solver) from their sigma; flow from s."""
    if prediction_type == "flow":
        s = float(scheduler.sigmas[begin_index])
        return 1.0 - s, s
    if isinstance(scheduler, (DDPMScheduler,)) or not hasattr(scheduler, "sigmas"):
        t = int(scheduler.timesteps[begin_index])
        ac = float(scheduler.alphas_cumprod[t])
        return math.sqrt(ac), math.sqrt(1 - ac)
    ve_sigma = float(scheduler.sigmas[begin_index])
    alpha = 1.0 / math.sqrt(1.0 + ve_sigma**2)
    return alpha, ve_sigma * alpha


def noised_start(scheduler: SchedulerMixin, x0: torch.Tensor, noise: torch.Tensor, begin_index: int) -> torch.Tensor:
    """x_ts in the sampler's own sample space (img2img start), as diffusers pipelines build it."""
    t = scheduler.timesteps[begin_index : begin_index + 1].repeat(x0.shape[0]).to(x0.device)
    if hasattr(scheduler, "scale_noise"):  # flow matching
        return scheduler.scale_noise(x0, t, noise)
    return scheduler.add_noise(x0, noise, t)
