"""What the core asks of a trainer: a thin model adapter.

The core never touches a trainer's objects. A trainer (our own, sd-scripts,
OneTrainer, the demo) wraps its denoiser, scheduler config, unconditional
conditioning and decoder in an object of this shape.

Conditioning is a plain dict of tensors batched along dim 0 (for SD1.x
``{"encoder_hidden_states": ...}``; SDXL adds ``text_embeds`` and ``time_ids``;
SD3 adds ``pooled_projections``; the digits demo uses ``{"labels": ...}``), so
that the core can batch the conditional and unconditional passes of
classifier-free guidance into one forward without knowing what the keys mean.

A denoiser that takes the guidance value as an input (FLUX.1-dev, guidance-
distilled) finds it under `GUIDANCE_KEY` (shape [B]); the rollout puts it there.
Where the key is absent (training-time calls) the model's family says what to use.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, runtime_checkable

import torch

Cond = Mapping[str, Optional[torch.Tensor]]

#: the conditioning key of an embedded guidance value (one float per sample)
GUIDANCE_KEY = "guidance"


@runtime_checkable
class ModelAdapter(Protocol):
    #: the model's own noise-scheduler config (diffusers format)
    scheduler_config: Mapping[str, Any]

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's raw output (epsilon, v or velocity, as the model was trained)
        for a scheduler-scaled `sample` at `timestep` (shape [B])."""

    def uncond(self, cond: Cond) -> Cond:
        """The unconditional conditioning for a batch shaped like `cond`."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], differentiable w.r.t. `latents` (identity for pixel models)."""


def cat_cond(first: Cond, second: Cond) -> dict[str, Optional[torch.Tensor]]:
    if first.keys() != second.keys():
        raise ValueError(f"conditioning keys differ: {sorted(first)} vs {sorted(second)}")
    return {k: None if first[k] is None else torch.cat([first[k], second[k]]) for k in first}


def guided_denoise(
    model: ModelAdapter,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    cond: Cond,
    uncond: Optional[Cond],
    guidance_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance as at inference: (guided output, conditional output).

    Both passes go through the denoiser in one batched forward. A scale <= 1 means
    no guidance (one conditional pass)."""
    batch = sample.shape[0]
    t = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep
    if guidance_scale <= 1.0 or uncond is None:
        out = model.denoise(sample, t, cond)
        return out, out
    out = model.denoise(torch.cat([sample, sample]), torch.cat([t, t]), cat_cond(uncond, cond))
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance_scale * (out_cond - out_uncond), out_cond
