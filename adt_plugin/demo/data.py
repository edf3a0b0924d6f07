"""The demo's data: scikit-learn's bundled 8x8 digits (1797 images, no download).

Splits (stratified by class, fixed by `split_seed`, identical for every strategy
and every run seed):

    base          half of the digits, as written            -> trains the base model,
                                                                the discriminator's feature net
    target train  the other half, shifted ("italic"), 60 %   -> fine-tuning data
    target test   the rest of that half, shifted, 40 %       -> held out: FD, diffusion loss

The shift is a handwriting style the base model never saw: the digits slanted to
the right (a shear of the image) and written with a finer pen (ink intensity
raised to a power > 1, so faint edge pixels fade and strokes look crisper). The
classes stay the same and stay legible, so a fine-tune has something new to
learn (the style) while class accuracy still tells whether identity survived:
the situation of a style LoRA on Stable Diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NUM_CLASSES = 10


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 1, 8, 8] in [-1, 1], labels [1797]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except Exception as err:  # noqa: BLE001 - any broken install means the same thing
        raise RuntimeError(
            "the demo needs scikit-learn for its bundled digits data set; install the demo extra: "
            'pip install -e ".[demo]"'
        ) from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # ink 0..16
    return images / 8.0 - 1.0, torch.tensor(digits.target, dtype=torch.long)


def italic(images: torch.Tensor, shear: float = 0.35, ink_gamma: float = 1.5) -> torch.Tensor:
    """Slant right by `shear` (x moves by shear * y, bilinear) and thin the ink
    (intensity in [0, 1] raised to `ink_gamma`). Images in [-1, 1], [B, 1, H, W]."""
    b = images.shape[0]
    theta = torch.tensor([[1.0, shear, 0.0], [0.0, 1.0, 0.0]], dtype=images.dtype).expand(b, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    ink = F.grid_sample((images + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ink.clamp(0, 1).pow(ink_gamma) * 2 - 1


SHIFTS = {"italic": italic}


def stratified_split(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (first, rest): `fraction` of every class in `first`, rounded per class."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"a split fraction must be in (0, 1), got {fraction}")
    first, rest = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        k = int(round(fraction * len(idx)))
        first.append(idx[:k])
        rest.append(idx[k:])
    return torch.sort(torch.cat(first)).values, torch.sort(torch.cat(rest)).values


@dataclass
class DigitSplits:
    base_x: torch.Tensor
    base_y: torch.Tensor
    train_x: torch.Tensor  # shifted
    train_y: torch.Tensor
    test_x: torch.Tensor  # shifted, held out
    test_y: torch.Tensor
    shift: str
    indices: dict[str, torch.Tensor]  # positions in load_digits() of each split's images

    def sizes(self) -> dict[str, int]:
        return {"base": len(self.base_y), "target_train": len(self.train_y), "target_test": len(self.test_y)}


def make_splits(shift: str = "italic", base_fraction: float = 0.5, test_fraction: float = 0.4, split_seed: int = 0) -> DigitSplits:
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; known: {', '.join(SHIFTS)}")
    images, labels = load_digit_images()
    gen = torch.Generator().manual_seed(split_seed)
    base, target = stratified_split(labels, base_fraction, gen)
    test_rel, train_rel = stratified_split(labels[target], test_fraction, gen)
    train, test = target[train_rel], target[test_rel]
    transform = SHIFTS[shift]
    return DigitSplits(
        base_x=images[base],
        base_y=labels[base],
        train_x=transform(images[train]),
        train_y=labels[train],
        test_x=transform(images[test]),
        test_y=labels[test],
        shift=shift,
        indices={"base": base, "target_train": train, "target_test": test},
    )
