"""Loss strategies, registered by the names users type.

A strategy is a `LossStrategy` subclass (the contract: `base.py`) with a `name`,
a `from_settings` classmethod and the `@register_strategy` decorator; importing
its module here is the one other line it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

# each module registers its strategy; this order is the order users see them listed in
from . import ft  # noqa: F401, I001
from . import adt  # noqa: F401
from . import ip  # noqa: F401
from . import at  # noqa: F401
from .base import STRATEGIES, Cost, CountingAdapter, LossStrategy, StrategyOutput, TrainBatch, register_strategy

if TYPE_CHECKING:
    from ..settings import AdtSettings


def build_strategy(
    settings: "AdtSettings",
    scheduler_config: Mapping[str, Any],
    backbone: Optional[torch.nn.Module] = None,
    backbone_loader: Optional[Callable[[], torch.nn.Module]] = None,
    device: Any = None,
    micro_batches: int = 1,
) -> LossStrategy:
    """The strategy `settings.strategy`. Only strategies with a discriminator (`adt`) need a
    backbone: pass one, or a loader that is called only when it is needed (default: DINOv2
    from `settings.backbone_path`). `micro_batches`: the loop's gradient accumulation."""
    try:
        cls = STRATEGIES[settings.strategy]
    except KeyError:
        raise ValueError(f"unknown strategy {settings.strategy!r}; known: {', '.join(STRATEGIES)}") from None
    return cls.from_settings(
        settings,
        scheduler_config,
        micro_batches=micro_batches,
        device=device,
        backbone=backbone,
        backbone_loader=backbone_loader,
    )


__all__ = [
    "STRATEGIES",
    "Cost",
    "CountingAdapter",
    "LossStrategy",
    "StrategyOutput",
    "TrainBatch",
    "build_strategy",
    "register_strategy",
]
