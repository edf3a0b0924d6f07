"""The ADT discriminator's own judgement of an image, from `<name>.adt_disc.safetensors`.

Siamese discriminator (Eq. 6): D_i(x) = cos(g_i(h_i(F_i(x))), h'_i(F_i(r))) for a
reference r. In training, real images are scored against themselves (two
augmentations) and pushed towards +1; generated ones against their real image,
towards -1. Here, without augmentation (deterministic):

  * reference="self": r = x, i.e. the score the discriminator would give x as a
    real image (in [-1, 1]; higher = more "real" to it);
  * reference images given: the mean over them of D(x) against each.

Projected (StyleGAN-T) discriminator: the mean per-token logit.
The number is the discriminator's, only comparable between images scored by
the same file; it is not a calibrated quality measure.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..checkpoint import CheckpointMismatch, discriminator_fingerprint, read_discriminator_file
from ..discriminator import DiscriminatorConfig, build_discriminator
from .images import prepare_each, resize


class DiscriminatorScorer:
    def __init__(self, disc, path: Path, metadata: dict):
        self.disc = disc.eval()
        self.path = path
        self.step = int(metadata.get("step", -1))
        self.description = (
            f"ADT discriminator {path.name} (step {self.step}, {disc.config.kind}, backbone {disc.backbone_identity}), "
            f"mean over taps {list(disc.config.taps)}; no augmentation; images resized to "
            f"{disc.backbone.input_size}px (bicubic, antialiased)"
        )

    def _pixels(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        size = self.disc.backbone.input_size
        batch = prepare_each(images, lambda x: resize(x.float(), size))
        return (batch * 2 - 1).to(next(self.disc.parameters()).device)

    @torch.no_grad()
    def scores(
        self, images: Sequence[torch.Tensor] | torch.Tensor, references: Optional[Sequence[torch.Tensor]] = None
    ) -> torch.Tensor:
        """[B] scores for images [3, H, W] in [0, 1]."""
        unused = torch.Generator()  # no augmentation: the generator is never drawn from
        features = self.disc.features(self._pixels(images), unused)
        if not self.disc.needs_reference:
            return torch.stack([s.mean(dim=1) for s in self.disc.scores(features)]).mean(0).cpu()
        if references is None:
            per_tap = self.disc.scores(features, self.disc.reference(features))
            return torch.stack(per_tap).mean(0).cpu()
        ref_features = self.disc.features(self._pixels(references), unused)
        reference = self.disc.reference(ref_features)  # per tap [M, D]
        batch = features[0].shape[0]
        total = torch.zeros(batch)
        for m in range(reference[0].shape[0]):
            one = [z[m : m + 1].expand(batch, -1) for z in reference]
            total += torch.stack(self.disc.scores(features, one)).mean(0).cpu()
        return total / reference[0].shape[0]


def load_discriminator_scorer(
    path: str | os.PathLike, backbone: Optional[torch.nn.Module] = None, backbone_path: Optional[str] = None, device=None
) -> DiscriminatorScorer:
    """Build the discriminator a checkpoint was saved from and load its weights.

    The frozen backbone is not in the file: pass it, or a local `backbone_path`
    (default: the path recorded at training time)."""
    path = Path(os.path.expanduser(str(path)))
    tensors, metadata = read_discriminator_file(path)
    config_dict = json.loads(metadata["discriminator_config"])
    config = DiscriminatorConfig(**config_dict)
    if backbone is None:
        from ..backbones import load_dinov2

        backbone = load_dinov2(backbone_path or config.backbone_path, taps=config.taps)
    disc = build_discriminator(backbone, replace(config, augment=""))
    saved = json.loads(metadata["fingerprint"])
    current = discriminator_fingerprint(disc)
    differs = [f"{k}: file {saved.get(k)!r}, backbone given {current[k]!r}" for k in current if saved.get(k) != current[k]]
    if differs:
        raise CheckpointMismatch(f"{path} was trained with another backbone or layout: " + "; ".join(differs))
    state = {k[len("disc.") :]: v for k, v in tensors.items() if k.startswith("disc.")}
    missing, unexpected = disc.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise CheckpointMismatch(f"{path}: discriminator weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return DiscriminatorScorer(disc.to(device), path, metadata)
