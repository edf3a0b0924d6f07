"""Fine-tune the base model with each strategy, for each seed, on identical data,
and evaluate. Everything goes through the core: `build_strategy` (ft, adt, ip, at),
the same rollout / discriminator / AdtStrategy code as the Stable Diffusion path,
with the digits UNet behind a `ModelAdapter`.

Per seed, every strategy starts from the same base weights, sees the same
batches in the same order (with the same dropped labels) for the same number of
iterations (strategy calls), and is evaluated with the same sampling noise.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional

import torch

from ..settings import AdtSettings
from ..strategies import TrainBatch, build_strategy
from .data import DigitSplits
from .metrics import Evaluator, SamplerSetting
from .models import SCHEDULER_CONFIG, DigitsAdapter, build_unet
from .pretrain import Pretrained, PretrainConfig, drop_labels

STRATEGY_ORDER = ("base", "ft", "adt", "ip", "at")

# What the demo changes from the core's defaults, and why (docs/demo.md, "What the digits study found"):
DEMO_ADT: dict[str, Any] = {
    # a generator step every iteration: with the paper's H = 5 the generator gets a fifth
    # of FT's updates in the same number of iterations and does not even learn the style
    "g_every": 1,
    "d_lr": 1e-3,  # = the generator's learning rate, as in the paper
    # warm-ups of 1000 / 500 steps are for runs of thousands of steps; these are 200
    "g_warmup_steps": 0,
    "d_warmup_steps": 0,
    # the style here *is* the ink intensity, which colour augmentation randomises away
    # (the discriminator then cannot see it); cutout hides half of an 8x8 digit
    "augment": "translation",
    # per-token realism (StyleGAN-T head) beat the siamese score on this data, see the study
    "discriminator": "projected",
}


@dataclass(frozen=True)
class DemoConfig:
    strategies: tuple[str, ...] = STRATEGY_ORDER
    seeds: tuple[int, ...] = (0, 1, 2)
    iters: int = 300
    batch: int = 64
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # or "constant"; the same for every strategy
    label_dropout: float = 0.1
    # the sampler the fine-tune is for (ADT's rollout) and the first evaluation column
    train_setting: SamplerSetting = SamplerSetting("ddim", 4, 2.0)
    # further evaluation settings: more steps, no guidance, stronger guidance, another sampler
    other_settings: tuple[SamplerSetting, ...] = (
        SamplerSetting("ddim", 25, 2.0),
        SamplerSetting("ddim", 4, 1.0),
        SamplerSetting("dpmsolver++", 8, 2.0),
    )
    curve_points: int = 4  # evaluations during fine-tuning, at the train setting
    eval_images: int = 0  # held-out images to compare with (0: all of them)
    # settings of the core strategies (AdtSettings fields) on top of the core's defaults;
    # sampler / steps / guidance / seed are filled in from train_setting and the run seed
    adt: dict[str, Any] = field(default_factory=lambda: dict(DEMO_ADT))
    pretrain: PretrainConfig = PretrainConfig()

    @property
    def eval_settings(self) -> tuple[SamplerSetting, ...]:
        return (self.train_setting, *self.other_settings)

    def strategy_settings(self, name: str, seed: int) -> AdtSettings:
        values = {**self.adt, "strategy": name, "seed": seed}
        values.update(
            sampler=self.train_setting.sampler,
            num_inference_steps=self.train_setting.steps,
            guidance_scale=self.train_setting.cfg,
        )
        return AdtSettings.from_mapping(values, source="demo settings")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["eval_settings"] = [s.key for s in self.eval_settings]
        return out


def lr_factor(cfg: DemoConfig, it: int) -> float:
    """The fine-tuning learning-rate schedule (iteration `it` counts from 1)."""
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (it - 1) / max(1, cfg.iters)))
    raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")


def curve_iterations(iters: int, points: int) -> list[int]:
    """Iterations (after which) the curve is measured: evenly spaced, ending at `iters`."""
    if points <= 0 or iters <= 0:
        return []
    return sorted({max(1, round(iters * (k + 1) / points)) for k in range(points)})


def eval_seed(seed: int, setting_index: int) -> int:
    """Sampling noise: per (run seed, setting), the same for every strategy."""
    return 10_000 + 100 * seed + setting_index


def evaluate_model(adapter: DigitsAdapter, evaluator: Evaluator, cfg: DemoConfig, seed: int):
    """({setting key: metrics}, held-out diffusion loss, {setting key: samples})."""
    adapter.unet.eval()
    metrics, samples = {}, {}
    for i, setting in enumerate(cfg.eval_settings):
        metrics[setting.key], samples[setting.key] = evaluator.evaluate(adapter, setting, eval_seed(seed, i))
    return metrics, evaluator.diffusion_loss(adapter), samples


def run_one(
    name: str,
    seed: int,
    cfg: DemoConfig,
    splits: DigitSplits,
    pre: Pretrained,
    evaluator: Evaluator,
    progress: Optional[Callable[[int], None]] = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Fine-tune one strategy for one seed (or evaluate the base) -> (record, samples)."""
    torch.manual_seed(seed)
    unet = build_unet(cfg.pretrain.unet_widths)
    unet.load_state_dict(pre.base_state)
    adapter = DigitsAdapter(unet)
    record: dict[str, Any] = {"strategy": name, "seed": seed, "curve": []}
    start = time.perf_counter()
    if name != "base":
        record.update(_finetune(name, seed, cfg, splits, pre, evaluator, adapter, record["curve"], progress))
    record["train_seconds"] = time.perf_counter() - start
    metrics, diff_loss, samples = evaluate_model(adapter, evaluator, cfg, seed)
    record["metrics"] = metrics
    record["diff_loss"] = diff_loss
    return record, samples


def _finetune(name, seed, cfg, splits, pre, evaluator, adapter, curve, progress) -> dict[str, Any]:
    settings = cfg.strategy_settings(name, seed)
    strategy = build_strategy(settings, SCHEDULER_CONFIG, backbone=pre.feature_net)
    unet = adapter.unet
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(seed)  # the same batches for every strategy
    points = set(curve_iterations(cfg.iters, cfg.curve_points))
    g_updates, last_logs, sums = 0, {}, {}
    for it in range(1, cfg.iters + 1):
        unet.train()
        idx = torch.randint(0, len(splits.train_y), (cfg.batch,), generator=data_gen)
        labels = drop_labels(splits.train_y[idx], cfg.label_dropout, data_gen)
        out = strategy(adapter, TrainBatch(splits.train_x[idx], {"labels": labels}))
        if out.updates_generator:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, it) * strategy.latest_generator_lr_factor()
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            g_updates += 1
        last_logs = out.logs
        for k, v in out.logs.items():
            sums[k] = sums.get(k, 0.0) + v
        if it in points:
            unet.eval()
            metrics, _ = evaluator.evaluate(adapter, cfg.train_setting, eval_seed(seed, 0))
            curve.append({"iter": it, **metrics})
        if progress:
            progress(1)
    return {
        "settings": settings.to_dict(),
        "generator_updates": g_updates,
        "mean_logs": {k: v / cfg.iters for k, v in sums.items()},
        "last_logs": last_logs,
    }


def run_demo(
    cfg: DemoConfig,
    splits: DigitSplits,
    pre: Pretrained,
    progress: Optional[Any] = None,
    workers: int = 1,
) -> tuple[list[dict[str, Any]], dict[int, dict[str, dict[str, torch.Tensor]]]]:
    """All runs: (records, samples[seed][strategy][setting key]). `progress` is a tqdm-like
    bar over all fine-tuning iterations (see `total_iterations`). With `workers` > 1 the
    (seed, strategy) runs are spread over that many processes of one thread each; every
    run seeds itself, so the results are the same as in one process."""
    jobs = [(seed, name) for seed in cfg.seeds for name in cfg.strategies]
    results: dict[tuple[int, str], tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
    if workers <= 1:
        evaluator = _evaluator(cfg, splits, pre)
        for seed, name in jobs:
            if progress is not None:
                progress.set_description(f"seed {seed} {name}")
            results[seed, name] = run_one(name, seed, cfg, splits, pre, evaluator, progress.update if progress else None)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: a forked copy of a process that already ran torch's thread pools can hang
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(cfg, splits, pre)) as pool:
            # the longest runs first, so that no process is left with one at the end
            cost = {"adt": 0, "at": 1}
            ordered = sorted(jobs, key=lambda job: cost.get(job[1], 2))
            futures = {pool.submit(_run_in_worker, seed, name): (seed, name) for seed, name in ordered}
            if progress is not None:
                progress.set_description(f"{len(jobs)} runs on {workers} processes")
            for future in as_completed(futures):
                seed, name = futures[future]
                results[seed, name] = future.result()
                if progress is not None and name != "base":
                    progress.update(cfg.iters)
    records, samples = [], {}
    for seed, name in jobs:
        record, seed_samples = results[seed, name]
        records.append(record)
        samples.setdefault(seed, {})[name] = seed_samples
    return records, samples


def _evaluator(cfg: DemoConfig, splits: DigitSplits, pre: Pretrained) -> Evaluator:
    n = cfg.eval_images or len(splits.test_y)
    return Evaluator(pre.classifier, splits.test_x[:n], splits.test_y[:n])


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: DemoConfig, splits: DigitSplits, pre: Pretrained) -> None:
    torch.set_num_threads(1)
    _WORKER.update(cfg=cfg, splits=splits, pre=pre, evaluator=_evaluator(cfg, splits, pre))


def _run_in_worker(seed: int, name: str):
    w = _WORKER
    return run_one(name, seed, w["cfg"], w["splits"], w["pre"], w["evaluator"])


def total_iterations(cfg: DemoConfig) -> int:
    return len(cfg.seeds) * sum(name != "base" for name in cfg.strategies) * cfg.iters


def full_config() -> DemoConfig:
    return DemoConfig()


def quick_config() -> DemoConfig:
    """The same study on a small budget (under 2 minutes on 2 CPU cores, the base model's
    training included): fewer iterations, fewer evaluation settings, the same cached base."""
    return replace(
        DemoConfig(),
        iters=50,
        curve_points=2,
        other_settings=(SamplerSetting("ddim", 4, 1.0), SamplerSetting("dpmsolver++", 8, 2.0)),
    )
