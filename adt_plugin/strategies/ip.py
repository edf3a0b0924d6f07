"""`ip`: input perturbation (DDPM-IP, Ning et al. 2023; the "IP" baseline of the AT paper).

At inference the denoiser sees its own, slightly wrong, previous outputs rather
than exactly noised data. IP simulates that error cheaply: the input is built with
extra Gaussian noise, the target keeps the original noise,

    x_t = alpha_t x0 + sigma_t (eps + gamma xi),    target = target(x0, eps, t)

(eps for epsilon models, alpha eps - sigma x0 for v, eps - x0 for flow). This is
sd-scripts' `--ip_noise_gamma`; gamma = 0.1 is DDPM-IP's default.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..adapter import ModelAdapter
from ..losses import diffusion_loss
from .base import StrategyOutput, TrainBatch
from .ft import FtStrategy


class IpStrategy(FtStrategy):
    name = "ip"

    def __init__(
        self,
        scheduler_config: Mapping[str, Any],
        gamma: float = 0.1,
        seed: int = 0,
        timestep_weighting: str = "uniform",
        family=None,
    ):
        super().__init__(scheduler_config, seed=seed, timestep_weighting=timestep_weighting, family=family)
        self.gamma = float(gamma)

    def __call__(self, model: ModelAdapter, batch: TrainBatch) -> StrategyOutput:
        x0 = batch.x0
        t, noise = self.draw(x0)
        extra = self.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise + self.gamma * extra, t)
        loss = diffusion_loss(model.denoise(x_t, t, batch.cond), self.schedule.target(x0, noise, t))
        self.step += 1
        return StrategyOutput(loss, True, {"loss/diff": float(loss.detach())})
