"""Training images: the kohya folder layout, aspect-ratio buckets, a resumable batch order.

    data/                     images with same-name captions: cat.png + cat.txt
      10_style/ a.jpg a.txt   a sub-folder `N_name` repeats its images N times per epoch

Every image is opened and decoded once at the start; an unreadable file, an image
without a caption (or with an empty one) and an image whose shorter side is below
`min_image_size` are reported with the reason and skipped, and the count is
printed. An empty result is an error before any model is loaded. Images are read
as they are shown: turned upright by their EXIF orientation, and 16-bit greyscale
scaled down to 8 bits (PIL's plain RGB conversion clips it to white).

The batch order is a pure function of (seed, epoch): each epoch shuffles every
bucket, cuts it into global batches (batch_size x processes, the last one filled
by wrapping around the bucket) and shuffles the batches. A run resumes at
(epoch, batch index) without replaying anything, and each process takes its own
slice of each global batch.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEATS = re.compile(r"^(\d+)_(.+)$")
ORIENTATION_TAG = 0x0112
# EXIF orientations that turn the image by 90 degrees (width and height swap)
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# Bumped whenever an image decodes to other pixels than before, so cached latents are rebuilt.
DECODE_VERSION = "upright-16bit/1"


class DataError(ValueError):
    """No usable training data; says where it looked and what was wrong."""


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    width: int
    height: int
    repeats: int = 1


@dataclass
class ScanReport:
    folder: Path
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"skipped {path}: {reason}" for path, reason in self.skipped]
        entries = sum(i.repeats for i in self.items)
        out.append(
            f"{len(self.items)} images ({entries} per epoch with repeats) from {self.folder}; "
            f"{len(self.skipped)} skipped"
        )
        return out


def _repeats_for(path: Path, root: Path) -> int:
    for part in path.relative_to(root).parts[:-1]:
        match = REPEATS.match(part)
        if match:
            return max(1, int(match.group(1)))
    return 1


def scan_folder(folder: str | Path, caption_extension: str = ".txt", min_image_size: int = 0) -> ScanReport:
    """Every image under `folder` with its caption; bad files are reported, not fatal."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    report = ScanReport(root)
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        caption_path = path.with_suffix(ext)
        if not caption_path.is_file():
            report.skipped.append((path, f"no caption file (expected {caption_path.name})"))
            continue
        try:
            caption = caption_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            report.skipped.append((path, f"caption {caption_path.name} cannot be read ({err})"))
            continue
        if not caption:
            report.skipped.append((path, f"caption file {caption_path.name} is empty"))
            continue
        try:
            with Image.open(path) as image:
                image.load()  # decode it all: a truncated file fails here, not mid-run
                width, height = image.size
                if image.getexif().get(ORIENTATION_TAG) in SWAPPING_ORIENTATIONS:
                    width, height = height, width  # as prepare_image will turn it
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds for bad files
            report.skipped.append((path, f"cannot be read as an image ({type(err).__name__}: {err})"))
            continue
        if min(width, height) < min_image_size:
            report.skipped.append((path, f"too small: {width}x{height}, shorter side below {min_image_size} px"))
            continue
        report.items.append(ImageItem(path, caption, width, height, _repeats_for(path, root)))
    if not report.items:
        detail = (
            f"; skipped {len(report.skipped)}: " + "; ".join(f"{p.name}: {r}" for p, r in report.skipped[:5])
            if report.skipped
            else ""
        )
        raise DataError(
            f"no usable training images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files with same-name "
            f"{ext} captions){detail}"
        )
    return report


# --- buckets -----------------------------------------------------------------------


def make_buckets(resolution: int, step: int = 64, min_size: int = 0, max_size: int = 0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of `step`, area <= resolution^2, sides within
    [min_size, max_size]; both orientations, square included."""
    min_size = min_size or max(step, resolution // 2)
    max_size = max_size or resolution * 2
    area = resolution * resolution
    buckets = {(resolution // step * step, resolution // step * step)}
    width = max(step, min_size // step * step)
    while width <= max_size:
        height = min(max_size, (area // width) // step * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    ratio = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), -buckets[i][0] * buckets[i][1]),
    )


def assign_buckets(items: Sequence[ImageItem], buckets: Sequence[tuple[int, int]]) -> list[int]:
    """The bucket (an index into `buckets`) of each image."""
    return [nearest_bucket(item.width, item.height, buckets) for item in items]


# --- batch order -------------------------------------------------------------------


def _seeded(*parts: int) -> torch.Generator:
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class BatchOrder:
    """Global batches of entry indices (an entry = one image, once per repeat)."""

    def __init__(self, entry_buckets: Sequence[int], global_batch: int, seed: int):
        self.entry_buckets = list(entry_buckets)
        self.global_batch = global_batch
        self.seed = seed
        self.by_bucket: dict[int, list[int]] = {}
        for entry, bucket in enumerate(self.entry_buckets):
            self.by_bucket.setdefault(bucket, []).append(entry)
        self.batches_per_epoch = sum(math.ceil(len(v) / global_batch) for v in self.by_bucket.values())

    def epoch(self, epoch: int) -> list[list[int]]:
        gen = _seeded(self.seed, epoch, 0xBA7C4)
        batches: list[list[int]] = []
        for bucket in sorted(self.by_bucket):
            entries = self.by_bucket[bucket]
            order = [entries[i] for i in torch.randperm(len(entries), generator=gen).tolist()]
            for start in range(0, len(order), self.global_batch):
                chunk = order[start : start + self.global_batch]
                while len(chunk) < self.global_batch:  # fill from the same bucket: every batch is full
                    chunk.append(order[(start + len(chunk)) % len(order)])
                batches.append(chunk)
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def iterate(self, epoch: int, index: int) -> Iterator[tuple[int, int, list[int]]]:
        """(epoch, index, global batch) from the position onward, forever."""
        while True:
            batches = self.epoch(epoch)
            for i in range(index, len(batches)):
                yield epoch, i, batches[i]
            epoch, index = epoch + 1, 0


# --- images ------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """One training image resized and cropped to its bucket, with SDXL's size conditioning."""

    pixels: torch.Tensor  # [3, H, W] in [-1, 1]
    original_size: tuple[int, int]  # (height, width) of the file
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    target_size: tuple[int, int]  # (height, width) of the bucket


def prepare_image(
    path: Path,
    bucket: tuple[int, int],
    random_crop: bool = False,
    flip: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Prepared:
    bw, bh = bucket
    with Image.open(path) as image:
        image = to_rgb(ImageOps.exif_transpose(image))
    width, height = image.size
    scale = max(bw / width, bh / height)  # cover the bucket, then crop the excess
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    image = image.resize((rw, rh), Image.Resampling.LANCZOS)
    if random_crop and generator is not None:
        top = int(torch.randint(0, rh - bh + 1, (1,), generator=generator))
        left = int(torch.randint(0, rw - bw + 1, (1,), generator=generator))
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    image = image.crop((left, top, left + bw, top + bh))
    if flip and generator is not None and bool(torch.rand(1, generator=generator) < 0.5):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return Prepared(pixels, (height, width), (top, left), (bh, bw))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit greyscale (PNG mode I;16, or I) is scaled to 8 bits first:
    PIL's own conversion clips every value above 255 to white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}"


def cache_key(*parts: Any) -> str:
    return hashlib.sha256("\n".join(str(p) for p in parts).encode()).hexdigest()[:32]


class TrainImages(torch.utils.data.Dataset):
    """Entries (images x repeats) in their buckets. `__getitem__((entry, epoch))`
    returns one sample dict; random crop, flip and caption dropout are drawn from
    a generator seeded by (seed, epoch, entry), so workers and resumed runs draw
    the same. With caches, `latent_files` (one per image) and `text_files` (one per
    caption) replace decoding the image and encoding the caption."""

    def __init__(
        self,
        items: Sequence[ImageItem],
        buckets: Sequence[tuple[int, int]],
        seed: int = 0,
        random_crop: bool = False,
        flip: bool = False,
        caption_dropout: float = 0.0,
        latent_files: Optional[Sequence[Path]] = None,
        text_files: Optional[Mapping[str, Path]] = None,
    ):
        self.items = list(items)
        self.buckets = list(buckets)
        self.item_bucket = assign_buckets(self.items, self.buckets)
        self.entries = [index for index, item in enumerate(self.items) for _ in range(item.repeats)]
        self.seed = seed
        self.random_crop, self.flip, self.caption_dropout = random_crop, flip, caption_dropout
        self.latent_files = list(latent_files) if latent_files is not None else None
        self.text_files = dict(text_files) if text_files is not None else None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def entry_buckets(self) -> list[int]:
        return [self.item_bucket[i] for i in self.entries]

    def bucket_of(self, item_index: int) -> tuple[int, int]:
        return self.buckets[self.item_bucket[item_index]]

    def caption_for(self, entry: int, epoch: int) -> str:
        item = self.items[self.entries[entry]]
        if self.caption_dropout and bool(
            torch.rand(1, generator=_seeded(self.seed, epoch, entry, 0xCA7)) < self.caption_dropout
        ):
            return ""
        return item.caption

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        entry, epoch = key
        index = self.entries[entry]
        item = self.items[index]
        caption = self.caption_for(entry, epoch)
        sample: dict[str, Any] = {"caption": caption, "path": str(item.path)}
        if self.latent_files is not None:
            cached = load_file(str(self.latent_files[index]))
            sample["latents"] = cached["latents"]
            sample["size_cond"] = cached["size_cond"]
        else:
            prepared = prepare_image(
                item.path, self.bucket_of(index), self.random_crop, self.flip, _seeded(self.seed, epoch, entry, 0x1A6)
            )
            sample["pixels"] = prepared.pixels
            sample["size_cond"] = torch.tensor(
                [*prepared.original_size, *prepared.crop_top_left, *prepared.target_size]
            )
        if self.text_files is not None:
            sample["text"] = load_file(str(self.text_files[caption]))
        return sample


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"caption": [s["caption"] for s in samples], "path": [s["path"] for s in samples]}
    for key in ("pixels", "latents", "size_cond"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples])
    if "text" in samples[0]:
        out["text"] = {k: torch.stack([s["text"][k] for s in samples]) for k in samples[0]["text"]}
    return out
