"""Compute every metric whose weights are available for a set of generated images.

Set metrics (against a reference folder): FID and KID in FID-Inception features,
FD-DINOv2 and KID in DINOv2 features. Per-image metrics: CLIP score, aesthetic
score, HPSv2. A metric whose weights (or optional packages) are missing is
skipped with the reason; the others still run. One network is in memory at a time.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from .frechet import frechet_distance_of, kernel_inception_distance
from .images import iter_image_batches, list_images
from .scores import ScoreTable
from .weights import WEIGHTS, WeightsNotFound, missing_message, resolve_weights

# (prompt index, seed, path) for each generated image of one model
GeneratedSet = Sequence[tuple[int, int, Path]]


@dataclass
class MetricWeights:
    """Local paths of each metric's weights (None: not available)."""

    inception: Optional[Path] = None
    dinov2: Optional[Path] = None
    clip: Optional[Path] = None
    aesthetic: Optional[Path] = None
    hps: Optional[Path] = None

    @classmethod
    def resolve(
        cls, explicit: Mapping[str, Optional[str]], folders: Sequence[str], echo: Callable[[str], None] = print
    ) -> "MetricWeights":
        """An explicit path or hub id wins and must resolve (a hub id is downloaded now when
        online and not cached); otherwise the standard names in `folders`, then the
        metric's hub id if it is already in the Hugging Face cache."""
        return cls(**{key: resolve_weights(key, explicit.get(key), folders, echo) for key in WEIGHTS})


@dataclass
class EvalResult:
    set_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> model -> value
    kid_std: dict[str, dict[str, float]] = field(default_factory=dict)
    table: ScoreTable = field(default_factory=ScoreTable)
    descriptions: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    reference: Optional[dict] = None


def _skip(result: EvalResult, metrics: Sequence[str], reason: str) -> None:
    for metric in metrics:
        result.skipped[metric] = reason


def _chunks(generated: Mapping[str, GeneratedSet], batch_size: int, tick: Callable[[int], None]):
    """(model, [(prompt, seed, path)], [images]) in batches, ticking the progress bar."""
    for model, items in generated.items():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            yield model, chunk, next(iter_image_batches([p for _, _, p in chunk], len(chunk)))
            tick(len(chunk))


def _features(extract, files: Sequence[Path], batch_size: int, tick: Callable[[int], None]) -> torch.Tensor:
    parts = []
    for batch in iter_image_batches(files, batch_size):
        parts.append(extract(batch))
        tick(len(batch))
    return torch.cat(parts)


def _reference_features(
    extract, weights_path: Optional[Path], files: Sequence[Path], cache_dir: Optional[Path], batch_size: int, tick
) -> torch.Tensor:
    """Reference features, cached by the network (description, weights file) and the
    images' names, sizes and times."""
    if cache_dir is None:
        return _features(extract, files, batch_size, tick)
    key = hashlib.sha1(extract.description.encode())
    for path in ([weights_path] if weights_path is not None else []) + list(files):
        stat = path.stat()
        key.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    cache = cache_dir / f"ref-features-{key.hexdigest()[:16]}.safetensors"
    if cache.is_file():
        from safetensors.torch import load_file

        return load_file(str(cache))["features"]
    features = _features(extract, files, batch_size, tick)
    from ..fileio import atomic_save_safetensors

    atomic_save_safetensors({"features": features}, cache, {"network": extract.description, "images": str(len(files))})
    return features


def evaluate(
    generated: Mapping[str, GeneratedSet],
    prompts: Sequence[str],
    weights: MetricWeights,
    reference_dir: Optional[str | os.PathLike] = None,
    device=None,
    batch_size: int = 16,
    cache_dir: Optional[Path] = None,
    kid_subsets: int = 100,
    progress: Optional[Callable[[str, int], Callable[[int], None]]] = None,
    overrides: Optional[Mapping[str, Callable[[], object]]] = None,
) -> EvalResult:
    """`progress(label, total)` returns a tick(n) callback (e.g. a tqdm bar's update).
    `overrides` can replace a metric's loader (e.g. a stand-in HPSv2 scorer where open_clip is absent)."""
    result = EvalResult()
    progress = progress or (lambda label, total: (lambda n: None))
    loaders = dict(overrides or {})
    models = list(generated)
    total = sum(len(v) for v in generated.values())

    ref_files: list[Path] = []
    if reference_dir is None:
        _skip(result, ["fid", "kid", "fd_dinov2", "kid_dinov2"], "no --ref folder of real images given")
    else:
        ref_files = list_images(reference_dir)
        result.reference = {"folder": str(reference_dir), "images": len(ref_files)}

    set_networks = [("inception", ("fid", "kid")), ("dinov2", ("fd_dinov2", "kid_dinov2"))]
    for key, (fd_name, kid_name) in set_networks if ref_files else []:
        try:
            extract = _load(key, weights, loaders, device)
        except WeightsNotFound as err:
            _skip(result, [fd_name, kid_name], str(err))
            continue
        ref_tick = progress(f"{key} features (reference)", len(ref_files))
        ref = _reference_features(extract, getattr(weights, key), ref_files, cache_dir, batch_size, ref_tick)
        tick = progress(f"{key} features (generated)", total)
        for model in models:
            feats = _features(extract, [p for _, _, p in generated[model]], batch_size, tick)
            result.set_metrics.setdefault(fd_name, {})[model] = frechet_distance_of(feats, ref)
            kid = kernel_inception_distance(feats, ref, subsets=kid_subsets)
            result.set_metrics.setdefault(kid_name, {})[model] = kid.mean * 1e3
            result.kid_std.setdefault(kid_name, {})[model] = kid.std * 1e3
            subset = kid.subset_size
        note = f"; generated {min(len(v) for v in generated.values())}+ images per model vs {len(ref_files)} reference images"
        result.descriptions[fd_name] = f"Fréchet distance in {extract.description}{note}"
        result.descriptions[kid_name] = (
            f"KID x 1e3 (cubic polynomial kernel, unbiased MMD², {kid_subsets} subsets of {subset}) in the same features"
        )
        del extract

    _clip_metrics(result, generated, prompts, weights, device, batch_size, progress, loaders, total)
    _hps_metric(result, generated, prompts, weights, device, batch_size, progress, loaders, total)
    return result


def _load_inception(path: Path, device):
    from .features import InceptionFeatures
    from .inception import load_fid_inception

    return InceptionFeatures(load_fid_inception(path).to(device))


def _load_dinov2(path: Path, device):
    from .features import load_dinov2_features

    return load_dinov2_features(path, device=device)


def _load_clip(path: Path, device):
    from .clip import load_clip

    return load_clip(path, device=device)


def _load_aesthetic(path: Path, device):
    from .aesthetic import load_aesthetic_head

    return load_aesthetic_head(path)


def _load_hps(path: Path, device):
    from .hps import load_hps

    return load_hps(path, device=device)


LOADERS = {"inception": _load_inception, "dinov2": _load_dinov2, "clip": _load_clip, "aesthetic": _load_aesthetic, "hps": _load_hps}


def _load(key: str, weights: MetricWeights, overrides: Mapping[str, Callable[[], object]], device):
    """A metric's network: from `overrides` (tests), else from its weights path;
    WeightsNotFound (saying where to get it) when there is none."""
    if key in overrides:
        return overrides[key]()
    path = getattr(weights, key)
    if path is None:
        raise WeightsNotFound(missing_message(key))
    return LOADERS[key](path, device)


def _clip_metrics(result, generated, prompts, weights, device, batch_size, progress, loaders, total) -> None:
    try:
        clip = _load("clip", weights, loaders, device)
    except WeightsNotFound as err:
        _skip(result, ["clip", "aesthetic"], str(err))
        return
    head = None
    try:
        head = _load("aesthetic", weights, loaders, device)
    except WeightsNotFound as err:
        result.skipped["aesthetic"] = str(err)
    for model, chunk, images in _chunks(generated, batch_size, progress("CLIP / aesthetic", total)):
        emb = clip.image_embeddings(images)
        clip_scores = clip.clip_scores(emb, [prompts[p] for p, _, _ in chunk])
        aes = head(emb) if head is not None else None
        for i, (p, s, _) in enumerate(chunk):
            result.table.add("clip", model, p, s, clip_scores[i])
            if aes is not None:
                result.table.add("aesthetic", model, p, s, aes[i])
    result.descriptions["clip"] = f"CLIP score = 100 x max(cos(image, prompt), 0); {clip.description}"
    if head is not None:
        result.descriptions["aesthetic"] = (
            "LAION aesthetic predictor v2 (linear MLP on L2-normalised CLIP image embeddings, 1-10 scale); "
            + clip.description
        )


def _hps_metric(result, generated, prompts, weights, device, batch_size, progress, loaders, total) -> None:
    from .hps import HpsUnavailable

    try:
        scorer = _load("hps", weights, loaders, device)
    except (WeightsNotFound, HpsUnavailable) as err:
        result.skipped["hps"] = str(err)
        return
    for model, chunk, images in _chunks(generated, batch_size, progress("HPSv2", total)):
        values = scorer.scores(images, [prompts[p] for p, _, _ in chunk])
        for i, (p, s, _) in enumerate(chunk):
            result.table.add("hps", model, p, s, values[i])
    result.descriptions["hps"] = scorer.description
