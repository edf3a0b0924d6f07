"""The interface a trainer calls once per step.

    output = strategy(model_adapter, TrainBatch(x0=latents, cond=conditioning))
    if output.updates_generator:
        backward(output.loss); step the generator's optimizer
    log(output.logs)

A strategy owns everything of its own (random generator, discriminator and its
optimizer) and saves it through `state_dict` / `load_state_dict`, so that a
resumed run draws exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch

from ..adapter import Cond, ModelAdapter


@dataclass
class TrainBatch:
    x0: torch.Tensor  # clean latents (pixels for pixel-space models), [B, ...]
    cond: Cond


@dataclass
class StrategyOutput:
    #: what to back-propagate when `updates_generator`; else the detached plain
    #: diffusion loss, for logging only
    loss: torch.Tensor
    updates_generator: bool
    logs: dict[str, float] = field(default_factory=dict)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class LossStrategy(ABC):
    name: str = ""
    #: calls that make up one optimizer step (gradient accumulation). A strategy
    #: that alternates generator and discriminator-only iterations decides per
    #: window of this many calls, so an accumulated step never mixes the two.
    micro_batches: int = 1

    def __init__(self, seed: int = 0):
        self.step = 0
        # Each process draws its own start steps, noise and augmentations (the
        # discriminator's weights stay identical through its gradient all-reduce).
        self.generator = torch.Generator().manual_seed(seed + _rank())

    @abstractmethod
    def __call__(self, model: ModelAdapter, batch: TrainBatch) -> StrategyOutput: ...

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        # Drawn on the CPU from the strategy's own generator, so runs are
        # reproducible across devices and resumable.
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    def generator_lr_factor(self, step: Optional[int] = None) -> float:
        """Multiplier for the generator's learning rate at `step` (trainers apply it)."""
        return 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rng": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["rng"])
