"""Loss strategies: a registry from the names users type to the classes."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch

from .base import LossStrategy, StrategyOutput, TrainBatch

# name -> one-line description; the classes are imported lazily in build_strategy
STRATEGIES: dict[str, str] = {
    "ft": "plain diffusion loss (the baseline)",
    "adt": "Adversarial Diffusion Tuning: rollout + discriminator + lambda x diffusion loss",
    "ip": "input perturbation: x_t built with noise + gamma x extra noise, target unchanged (DDPM-IP)",
    "at": "adversarial training of the denoiser input: worst delta in a norm ball, target corrected (AT)",
}


def build_strategy(
    settings: "AdtSettings",  # noqa: F821
    scheduler_config: Mapping[str, Any],
    backbone: Optional[torch.nn.Module] = None,
    backbone_loader: Optional[Callable[[], torch.nn.Module]] = None,
    device: Any = None,
) -> LossStrategy:
    """The strategy `settings.strategy` (ft, adt, ip, at). Only `adt` needs a backbone: pass one, or a
    loader that is called only when it is needed (default: DINOv2 from
    `settings.backbone_path`)."""
    if settings.strategy == "ft":
        from .ft import FtStrategy

        return FtStrategy(scheduler_config, seed=settings.seed)
    if settings.strategy == "ip":
        from .ip import IpStrategy

        return IpStrategy(scheduler_config, gamma=settings.ip_gamma, seed=settings.seed)
    if settings.strategy == "at":
        from .at import AtStrategy

        return AtStrategy(
            scheduler_config,
            steps=settings.at_steps,
            epsilon=settings.at_epsilon,
            step_size=settings.at_step_size,
            seed=settings.seed,
        )
    if settings.strategy == "adt":
        from ..backbones import load_dinov2
        from .adt import AdtStrategy

        if backbone is None:
            backbone = backbone_loader() if backbone_loader else load_dinov2(settings.backbone_path, settings.taps)
        decoder = None
        if settings.decoder_path:
            from ..decode import load_tiny_decoder

            decoder = load_tiny_decoder(settings.decoder_path, device)
        return AdtStrategy(scheduler_config, settings, backbone.to(device), device=device, decoder=decoder)
    raise ValueError(f"unknown strategy {settings.strategy!r}; known: {', '.join(STRATEGIES)}")


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


__all__ = ["STRATEGIES", "LossStrategy", "StrategyOutput", "TrainBatch", "build_strategy", "preflight"]
