"""Train the demo's base denoiser, the discriminator's feature net and the metric
classifier once, and cache them.

A cached file is named by a hash of everything that shapes it (its settings, the
data it was trained on, the torch version and a code-version tag), so changing a
setting trains a new one and never reuses a stale one. Files are written
atomically (safetensors) under `<cache>/demo/`; the default cache is
`$XDG_CACHE_HOME/adt-plugin` (else `~/.cache/adt-plugin`), or `$ADT_CACHE_DIR`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..fileio import atomic_save_safetensors
from ..strategies import TrainBatch
from ..strategies.ft import FtStrategy
from .data import DigitSplits
from .models import NULL_LABEL, SCHEDULER_CONFIG, DigitClassifier, DigitFeatureNet, DigitsAdapter, build_unet

# Bump when the code that trains a cached network changes what it produces.
CODE_VERSION = "1"


def default_cache_dir() -> Path:
    if os.environ.get("ADT_CACHE_DIR"):
        return Path(os.environ["ADT_CACHE_DIR"]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "adt-plugin"


@dataclass(frozen=True)
class PretrainConfig:
    unet_widths: tuple[int, ...] = (16, 32)
    base_iters: int = 1000
    base_batch: int = 32  # 64 took twice as long for a base barely better (FT from it: FD pixel 1.77 vs 1.84, seed 0)
    base_lr: float = 2e-3
    base_ema: float = 0.995
    label_dropout: float = 0.1  # classifier-free guidance: this share of labels become "no label"
    featnet_iters: int = 300
    featnet_noise: float = 0.0  # std of Gaussian noise added to its training inputs
    classifier_iters: int = 600
    seed: int = 0


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace a share `p` of labels by the "no label" index (CFG training)."""
    keep = torch.rand(labels.shape, generator=generator) >= p
    return torch.where(keep, labels, torch.full_like(labels, NULL_LABEL))


def _data_fingerprint(splits: DigitSplits) -> str:
    h = hashlib.sha256()
    for t in (splits.base_x, splits.base_y, splits.train_x, splits.train_y):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class ModelCache:
    def __init__(self, root: Optional[os.PathLike] = None, enabled: bool = True):
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.enabled = enabled

    def path(self, kind: str, key: dict) -> Path:
        blob = json.dumps({"kind": kind, "code": CODE_VERSION, "torch": torch.__version__, **key}, sort_keys=True, default=list)
        return self.root / "demo" / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.safetensors"

    def get_or_build(self, kind: str, key: dict, build: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
        """(state, was_cached). A file that does not load is rebuilt, not trusted."""
        path = self.path(kind, key)
        if self.enabled and path.exists():
            try:
                from safetensors.torch import load_file

                return load_file(str(path)), True
            except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt
                pass
        state = build()
        if self.enabled:
            atomic_save_safetensors(state, path, metadata={"kind": kind, "key": json.dumps(key, default=list)})
        return state, False


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def train_base(splits: DigitSplits, cfg: PretrainConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    """The base denoiser on the base split only (the unshifted style), with EMA weights."""
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg.unet_widths)
    ema = copy.deepcopy(unet).requires_grad_(False)
    adapter = DigitsAdapter(unet)
    loss_fn = FtStrategy(SCHEDULER_CONFIG, seed=cfg.seed)  # the core's own diffusion loss
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.base_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.base_lr, total_steps=cfg.base_iters, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all, y_all = splits.base_x, splits.base_y
    with _progress(cfg.base_iters, "base model", progress) as bar:
        for _ in range(cfg.base_iters):
            idx = torch.randint(0, len(y_all), (cfg.base_batch,), generator=gen)
            labels = drop_labels(y_all[idx], cfg.label_dropout, gen)
            out = loss_fn(adapter, TrainBatch(x_all[idx], {"labels": labels}))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for e, p in zip(ema.parameters(), unet.parameters()):
                    e.lerp_(p, 1 - cfg.base_ema)
            bar.update()
            bar.set_postfix(loss=f"{out.logs['loss/diff']:.3f}", refresh=False)
    return ema.state_dict()


def _train_classifier(
    net: nn.Module, logits_fn, x: torch.Tensor, y: torch.Tensor, iters: int, seed: int, desc: str, progress: bool, noise: float = 0.0
):
    """Cross-entropy with 1-pixel random shifts and optional input noise (robust
    features, not a memorised set)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    with _progress(iters, desc, progress) as bar:
        for _ in range(iters):
            idx = torch.randint(0, len(y), (128,), generator=gen)
            dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
            batch = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            if noise > 0:
                batch = batch + noise * torch.randn(batch.shape, generator=gen)
            loss = F.cross_entropy(logits_fn(batch), y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update()
    return net


def train_feature_net(splits: DigitSplits, cfg: PretrainConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed + 1)
    net = DigitFeatureNet()
    _train_classifier(
        net, net.logits, splits.base_x, splits.base_y, cfg.featnet_iters, cfg.seed + 1, "feature net", progress, cfg.featnet_noise
    )
    return net.state_dict()


def train_metric_classifier(splits: DigitSplits, cfg: PretrainConfig, progress: bool = True) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed + 2)
    net = DigitClassifier()
    x = torch.cat([splits.base_x, splits.train_x])
    y = torch.cat([splits.base_y, splits.train_y])
    _train_classifier(net, net, x, y, cfg.classifier_iters, cfg.seed + 2, "metric classifier", progress)
    return net.state_dict()


@dataclass
class Pretrained:
    base_state: dict[str, torch.Tensor]
    feature_net: DigitFeatureNet
    classifier: DigitClassifier
    cached: dict[str, bool]


def pretrain(splits: DigitSplits, cfg: PretrainConfig, cache: ModelCache, progress: bool = True) -> Pretrained:
    data = _data_fingerprint(splits)
    settings = asdict(cfg)
    base_key = {"data": data, **{k: v for k, v in settings.items() if not k.startswith(("featnet", "classifier"))}}
    base, base_hit = cache.get_or_build("base", base_key, lambda: train_base(splits, cfg, progress))
    feat_key = {"data": data, "featnet_iters": cfg.featnet_iters, "featnet_noise": cfg.featnet_noise, "seed": cfg.seed}
    feat_state, feat_hit = cache.get_or_build("featnet", feat_key, lambda: train_feature_net(splits, cfg, progress))
    cls_key = {"data": data, "classifier_iters": cfg.classifier_iters, "seed": cfg.seed}
    cls_state, cls_hit = cache.get_or_build("classifier", cls_key, lambda: train_metric_classifier(splits, cfg, progress))

    feature_net = DigitFeatureNet(identity=f"digits-cnn:{cache.path('featnet', feat_key).stem}")
    feature_net.load_state_dict(feat_state)
    feature_net.freeze()
    classifier = DigitClassifier()
    classifier.load_state_dict(cls_state)
    classifier.requires_grad_(False).eval()
    return Pretrained(base, feature_net, classifier, {"base": base_hit, "featnet": feat_hit, "classifier": cls_hit})
