"""Images as tensors for the metrics: [B, 3, H, W] float in [0, 1], RGB.

Every feature network states its own resize; the helpers here are the two it
uses (short-side resize + centre crop for CLIP, plain resize for DINOv2), both
bicubic with antialiasing in torch so a batch is processed the same on every
device.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from ..fileio import atomic_write_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] or [H, W, 3] float in [0, 1] -> PIL RGB."""
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image.permute(1, 2, 0)
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def iter_image_batches(files: Sequence[Path], batch_size: int) -> Iterator[list[torch.Tensor]]:
    """Lists of [3, H, W] tensors in [0, 1] (sizes may differ: each feature network
    resizes every image itself)."""
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            with Image.open(path) as image:
                batch.append(pil_to_tensor(image))
        yield batch


def prepare_each(images: Sequence[torch.Tensor] | torch.Tensor, prepare) -> torch.Tensor:
    """Apply a per-image resize to a list (or batch) of [3, H, W] images and stack."""
    return torch.cat([prepare(image.unsqueeze(0)) for image in images])


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Short side to `size` (bicubic, antialiased), then a centre crop: CLIP's preprocessing."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top : top + size, left : left + size].clamp(0, 1)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Both sides to `size` (bicubic, antialiased)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def save_png(image: Image.Image, path: str | os.PathLike, text: dict[str, str] | None = None) -> None:
    """Write a PNG atomically, with optional text chunks."""
    import io

    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buffer.getvalue())
