"""Fixed-seed sample grids with the sampler the rollout uses.

The grid runs the core's Rollout from pure noise over the whole inference
schedule with gradients off: the same sampler, step count, guidance (the family's
mode) and timesteps for the grid's latent size (FLUX.1-dev's shift depends on it)
that ADT trains against, so what the grid shows is what inference will give.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from PIL import Image

from ..adapter import ModelAdapter
from ..families import ModelFamily
from ..rollout import Rollout, RolloutConfig


def sample_latents(
    rollout: Rollout,
    adapter: ModelAdapter,
    cond: Mapping[str, torch.Tensor],
    shape: Sequence[int],
    seed: int,
    device,
) -> torch.Tensor:
    """One sample from noise drawn with `seed` (on the CPU, so every device draws the same)."""
    noise = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)).to(device)
    plan = rollout.plan(torch.Generator(), num_steps=rollout.schedule_length)
    scheduler = rollout.scheduler_for(noise.shape)  # the schedule for this latent size
    x_start = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching: pure noise
    return rollout.run(adapter, x_start, cond, plan, grad_mode="off").sample


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> an RGB image."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def grid(images: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    out = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        out.paste(image, ((i % columns) * w, (i // columns) * h))
    return out


def sample_grid(
    scheduler_config: Mapping,
    family: ModelFamily,
    rollout_config: RolloutConfig,
    adapter: ModelAdapter,
    conds: Sequence[Mapping[str, torch.Tensor]],
    latent_shape: Sequence[int],
    seed: int,
    device,
) -> Image.Image:
    """One image per conditioning (prompt i uses seed + i), in a grid."""
    rollout = Rollout(scheduler_config, rollout_config, device=device, family=family)
    images = []
    with torch.no_grad():
        for i, cond in enumerate(conds):
            latents = sample_latents(rollout, adapter, cond, (1, *latent_shape), seed + i, device)
            images.append(to_pil(adapter.decode(latents)[0]))
    return grid(images)


def pil_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["grid", "pil_bytes", "sample_grid", "sample_latents", "to_pil"]
