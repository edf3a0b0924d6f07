"""`ip`: input perturbation (DDPM-IP, Ning et al. 2023; the "IP" baseline of the AT paper).

At inference the denoiser sees its own, slightly wrong, previous outputs rather
than exactly noised data. IP simulates that error cheaply: the input is built with
extra Gaussian noise, the target keeps the original noise,

    x_t = alpha_t x0 + sigma_t (eps + gamma xi),    target = target(x0, eps, t)

(eps for epsilon models, alpha eps - sigma x0 for v, eps - x0 for flow). This is
sd-scripts' `--ip_noise_gamma`; gamma = 0.1 is DDPM-IP's default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ..adapter import ModelAdapter
from ..losses import diffusion_loss
from .base import StrategyOutput, TrainBatch, register_strategy
from .ft import FtStrategy

if TYPE_CHECKING:
    from ..settings import AdtSettings


@register_strategy
class IpStrategy(FtStrategy):
    name = "ip"
    description = "input perturbation: x_t built with noise + gamma x extra noise, target unchanged (DDPM-IP)"

    def __init__(
        self,
        scheduler_config: Mapping[str, Any],
        gamma: float,
        seed: int,
        micro_batches: int = 1,
        timestep_weighting: str = "uniform",
        family=None,
    ):
        super().__init__(scheduler_config, seed=seed, micro_batches=micro_batches, timestep_weighting=timestep_weighting, family=family)
        self.gamma = float(gamma)

    @classmethod
    def from_settings(cls, settings: "AdtSettings", scheduler_config: Mapping[str, Any], *, micro_batches: int = 1, family=None, **_: Any):
        strategy = cls(scheduler_config, gamma=settings.ip_gamma, seed=settings.seed, micro_batches=micro_batches, family=family)
        strategy.settings = settings
        return strategy

    def run(self, model: ModelAdapter, batch: TrainBatch) -> StrategyOutput:
        x0 = batch.x0
        t, noise = self.draw(x0)
        extra = self.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise + self.gamma * extra, t)
        loss = diffusion_loss(model.denoise(x_t, t, batch.cond), self.schedule.target(x0, noise, t))
        return StrategyOutput(loss, True, {"loss/diff": float(loss.detach())})
