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
    family: Any = None,
) -> LossStrategy:
    """The strategy `settings.strategy` (ft, adt, ip, at). Only `adt` needs a backbone: pass one, or a
    loader that is called only when it is needed (default: DINOv2 from
    `settings.backbone_path`). `family`: the model's `families.ModelFamily` (guidance mode,
    timesteps per latent size); None: what the scheduler config alone implies."""
    if settings.strategy == "ft":
        from .ft import FtStrategy

        return FtStrategy(scheduler_config, seed=settings.seed, family=family)
    if settings.strategy == "ip":
        from .ip import IpStrategy

        return IpStrategy(scheduler_config, gamma=settings.ip_gamma, seed=settings.seed, family=family)
    if settings.strategy == "at":
        from .at import AtStrategy

        return AtStrategy(
            scheduler_config,
            steps=settings.at_steps,
            epsilon=settings.at_epsilon,
            step_size=settings.at_step_size,
            seed=settings.seed,
            family=family,
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
        return AdtStrategy(scheduler_config, settings, backbone.to(device), device=device, decoder=decoder, family=family)
    raise ValueError(f"unknown strategy {settings.strategy!r}; known: {', '.join(STRATEGIES)}")


__all__ = ["STRATEGIES", "LossStrategy", "StrategyOutput", "TrainBatch", "build_strategy"]
