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
    family: Any = None,
) -> LossStrategy:
    """The strategy `settings.strategy`. Only strategies with a discriminator (`adt`) need a
    backbone: pass one, or a loader that is called only when it is needed (default: DINOv2
    from `settings.backbone_path`). `micro_batches`: the loop's gradient accumulation. `family`: the model's
    `families.ModelFamily` (guidance mode, timesteps per latent size); None: what the
    scheduler config alone implies."""
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
        family=family,
    )


def preflight(
    settings: "AdtSettings", echo: Callable[[str], None] = print, fetch: bool = True, prefix: str = ""  # noqa: F821
) -> list[str]:
    """Resolve the models `build_strategy` will load (adt: the backbone and decoder_path) and
    check the taps against the backbone's depth, reading config.json only. Every front end
    calls this before the diffusion model loads, so a missing backbone costs seconds, not a
    model load. With `fetch`, a hub id that is not cached is downloaded now (online), so
    the later load is instant. Returns one line per model saying where it comes from.
    `prefix` spells the settings as the front end does ("--adt_", "[adt] ", "adt.").

    Raises hub.ModelNotFound (what was looked for, where, and how to fetch it) or
    SettingsError (taps beyond the backbone's depth)."""
    if settings.strategy != "adt":
        return []
    from .. import hub
    from ..backbones import backbone_depth, check_taps, locate_dinov2
    from ..settings import SettingsError

    backbone = locate_dinov2(settings.backbone_path, setting=f"{prefix}backbone_path")
    backbone = hub.fetch(backbone, echo) if fetch else backbone
    lines = [f"backbone: {backbone.describe()}"]
    if backbone.path is not None:
        try:
            check_taps(settings.taps, backbone_depth(backbone), settings.backbone_path)
        except ValueError as err:
            raise SettingsError(f"{err}; change {prefix}taps or {prefix}backbone_path") from None
    if settings.decoder_path:
        from ..decode import locate_tiny_decoder

        decoder = locate_tiny_decoder(settings.decoder_path, setting=f"{prefix}decoder_path")
        decoder = hub.fetch(decoder, echo) if fetch else decoder
        lines.append(f"decoder: {decoder.describe()}")
    return lines


__all__ = [
    "STRATEGIES",
    "Cost",
    "CountingAdapter",
    "LossStrategy",
    "StrategyOutput",
    "TrainBatch",
    "build_strategy",
    "preflight",
    "register_strategy",
]
