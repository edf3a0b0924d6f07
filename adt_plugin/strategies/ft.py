"""`ft`: the plain single-step diffusion loss, the baseline every other strategy is compared with."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

from ..adapter import ModelAdapter
from ..families import ModelFamily
from ..losses import diffusion_loss
from ..noise import NoiseSchedule
from .base import LossStrategy, StrategyOutput, TrainBatch, register_strategy

if TYPE_CHECKING:
    from ..settings import AdtSettings


@register_strategy
class FtStrategy(LossStrategy):
    name = "ft"
    description = "plain diffusion loss (the baseline)"

    def __init__(
        self,
        scheduler_config: Mapping[str, Any],
        seed: int,
        micro_batches: int = 1,
        timestep_weighting: str = "uniform",
        family: Optional[ModelFamily] = None,
    ):
        super().__init__(seed, micro_batches)
        self.schedule = NoiseSchedule(scheduler_config, family)
        self.timestep_weighting = timestep_weighting

    @classmethod
    def from_settings(cls, settings: "AdtSettings", scheduler_config: Mapping[str, Any], *, micro_batches: int = 1, family=None, **_: Any):
        strategy = cls(scheduler_config, seed=settings.seed, micro_batches=micro_batches, family=family)
        strategy.settings = settings
        return strategy

    def draw(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, noise): a random training timestep per sample (shifted for this latent size
        where the family's schedule depends on it) and its noise."""
        t = self.schedule.sample_timesteps(
            x0.shape[0], self.generator, self.timestep_weighting, latent_size=tuple(x0.shape[-2:])
        ).to(x0.device)
        return t, self.randn_like(x0)

    def noised(self, x0: torch.Tensor):
        """(x_t, noise, t) for a random training timestep per sample."""
        t, noise = self.draw(x0)
        return self.schedule.add_noise(x0, noise, t), noise, t

    def run(self, model: ModelAdapter, batch: TrainBatch) -> StrategyOutput:
        x_t, noise, t = self.noised(batch.x0)
        loss = diffusion_loss(model.denoise(x_t, t, batch.cond), self.schedule.target(batch.x0, noise, t))
        return StrategyOutput(loss, True, {"loss/diff": float(loss.detach())})
