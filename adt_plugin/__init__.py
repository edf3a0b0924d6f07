"""Adversarial Diffusion Tuning (ADT) as a loss strategy.

The core knows no trainer: a trainer wraps its model in a `ModelAdapter`, builds a
strategy from `AdtSettings`, and calls it once per step.
"""

__version__ = "0.1.0"

from .adapter import Cond, ModelAdapter  # noqa: E402
from .settings import AdtSettings, SettingsError  # noqa: E402
from .strategies import STRATEGIES, Cost, LossStrategy, StrategyOutput, TrainBatch, build_strategy  # noqa: E402

__all__ = [
    "__version__",
    "AdtSettings",
    "Cond",
    "Cost",
    "LossStrategy",
    "ModelAdapter",
    "STRATEGIES",
    "SettingsError",
    "StrategyOutput",
    "TrainBatch",
    "build_strategy",
]
