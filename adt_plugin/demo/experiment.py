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
#: an arm run with ADT's compute (per seed, in denoiser forward-equivalents) instead of its iterations
AT_ADT_COMPUTE = "@C"
#: an FT arm sampled with epsilon scaling (evaluation only: the same weights)
EPS = "+eps"

# What the demo changes from the core's defaults, and why (docs/demo.md, "What the digits study found"):
DEMO_ADT: dict[str, Any] = {
    # a generator step every iteration (the core's default too): with the paper's H = 5 the
    # generator gets a fifth of FT's updates in the same number of iterations
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
    # strategies that also fine-tune with ADT's compute: per seed, each runs until its
    # forward-equivalents reach what that seed's ADT run spent (`<name>@C`; needs adt)
    equal_compute: tuple[str, ...] = ("ft", "ip", "at")
    # FT sampled with epsilon scaling (Ning et al. 2023; ComfyUI's "Epsilon Scaling" node): the
    # guided prediction divided by a factor, picked per model and sampler setting from these on
    # the fine-tuning images (never the held-out ones); `ft+eps`, `ft@C+eps`. () = no such arm.
    eps_factors: tuple[float, ...] = (1.0, 1.0025, 1.005, 1.01, 1.02)
    eps_select_images: int = 270  # fine-tuning images the factor is picked on (0: all)

    @property
    def compute_arms(self) -> tuple[str, ...]:
        """The strategies that also run with ADT's compute."""
        if "adt" not in self.strategies:
            return ()
        return tuple(n for n in self.equal_compute if n in self.strategies and n not in ("adt", "base"))

    @property
    def arms(self) -> tuple[str, ...]:
        """Every row of the report, in order: the strategies at equal iterations, FT with
        epsilon scaling, then the runs with ADT's compute."""
        eps = bool(self.eps_factors) and "ft" in self.strategies
        arms = [*self.strategies] + (["ft" + EPS] if eps else [])
        arms += [n + AT_ADT_COMPUTE for n in self.compute_arms]
        if eps and "ft" in self.compute_arms:
            arms.append("ft" + AT_ADT_COMPUTE + EPS)
        return tuple(arms)

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


def lr_factor(cfg: DemoConfig, done: float) -> float:
    """The fine-tuning learning-rate schedule at `done`, the share of the budget (iterations or
    compute) spent before this step: the same curve whether a run is counted in iterations or
    in compute (for FT at a compute budget, the cosine over ceil(budget / 3) iterations)."""
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, done))))
    raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")


def curve_iterations(iters: int, points: int) -> list[int]:
    """Iterations (after which) the curve is measured: evenly spaced, ending at `iters`."""
    if points <= 0 or iters <= 0:
        return []
    return sorted({max(1, round(iters * (k + 1) / points)) for k in range(points)})


def eval_seed(seed: int, setting_index: int) -> int:
    """Sampling noise: per (run seed, setting), the same for every strategy."""
    return 10_000 + 100 * seed + setting_index


class EpsScaled:
    """Epsilon scaling at sampling time (Ning et al. 2023, "Elucidating the exposure bias in
    diffusion models"): the denoiser's epsilon prediction divided by `factor` (a constant
    lambda, their uniform schedule). Guidance is linear, so this is the guided prediction
    divided by `factor`, which is what ComfyUI's "Epsilon Scaling" node does after CFG."""

    def __init__(self, model: DigitsAdapter, factor: float):
        self.model, self.factor = model, float(factor)
        self.scheduler_config = model.scheduler_config

    def denoise(self, sample, timestep, cond):
        return self.model.denoise(sample, timestep, cond) / self.factor

    def uncond(self, cond):
        return self.model.uncond(cond)

    def decode(self, latents):
        return latents


def evaluate_model(adapter, evaluator: Evaluator, cfg: DemoConfig, seed: int, factors: Optional[dict[str, float]] = None):
    """({setting key: metrics}, held-out diffusion loss, {setting key: samples}); `factors`:
    sample each setting with epsilon scaling by that factor."""
    adapter.unet.eval()
    metrics, samples = {}, {}
    for i, setting in enumerate(cfg.eval_settings):
        model = adapter if factors is None else EpsScaled(adapter, factors[setting.key])
        metrics[setting.key], samples[setting.key] = evaluator.evaluate(model, setting, eval_seed(seed, i))
    return metrics, evaluator.diffusion_loss(adapter), samples


def select_eps_factors(adapter: DigitsAdapter, cfg: DemoConfig, splits: DigitSplits, pre: Pretrained, seed: int) -> dict[str, Any]:
    """Per sampler setting, the epsilon-scaling factor of `cfg.eps_factors` whose samples are
    closest to the *fine-tuning* images (sum of both Frechet distances, each relative to no
    scaling): picked without the held-out set the reported metrics use."""
    n = cfg.eps_select_images or len(splits.train_y)
    gen = torch.Generator().manual_seed(20_000 + seed)
    pick = torch.randperm(len(splits.train_y), generator=gen)[:n]
    judge = Evaluator(pre.classifier, splits.train_x[pick], splits.train_y[pick])
    adapter.unet.eval()
    chosen, scores = {}, {}
    factors = sorted({1.0, *cfg.eps_factors})
    for i, setting in enumerate(cfg.eval_settings):
        per = {}
        for factor in factors:
            m, _ = judge.evaluate(EpsScaled(adapter, factor), setting, 30_000 + 100 * seed + i)
            per[factor] = m
        ref = per[1.0]
        score = {f: m["fd_pixel"] / ref["fd_pixel"] + m["fd_feature"] / ref["fd_feature"] for f, m in per.items()}
        chosen[setting.key] = min(factors, key=lambda f: (score[f], abs(f - 1.0)))
        scores[setting.key] = {str(f): {**per[f], "score": score[f]} for f in factors}
    return {"factors": chosen, "selection": scores}


def run_one(
    name: str,
    seed: int,
    cfg: DemoConfig,
    splits: DigitSplits,
    pre: Pretrained,
    evaluator: Evaluator,
    progress: Optional[Callable[[int], None]] = None,
    budget: Optional[float] = None,
) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
    """Fine-tune one strategy for one seed (or evaluate the base) -> [(record, samples)]:
    the run, and for FT (with `cfg.eps_factors`) the same model sampled with epsilon scaling.
    `budget`: run until this many denoiser forward-equivalents are spent (ADT's compute),
    instead of `cfg.iters` iterations."""
    torch.manual_seed(seed)
    unet = build_unet(cfg.pretrain.unet_widths)
    unet.load_state_dict(pre.base_state)
    adapter = DigitsAdapter(unet)
    arm = name + (AT_ADT_COMPUTE if budget is not None else "")
    record: dict[str, Any] = {"strategy": name, "arm": arm, "seed": seed, "curve": []}
    start = time.perf_counter()
    if name != "base":
        record.update(_finetune(name, seed, cfg, splits, pre, evaluator, adapter, record["curve"], progress, budget))
    record["train_seconds"] = time.perf_counter() - start
    metrics, diff_loss, samples = evaluate_model(adapter, evaluator, cfg, seed)
    record["metrics"] = metrics
    record["diff_loss"] = diff_loss
    out = [(record, samples)]
    if name == "ft" and cfg.eps_factors:
        eps = select_eps_factors(adapter, cfg, splits, pre, seed)
        metrics, diff_loss, samples = evaluate_model(adapter, evaluator, cfg, seed, eps["factors"])
        scaled = {k: v for k, v in record.items() if k not in ("curve", "metrics")}
        scaled.update(arm=arm + EPS, curve=[], metrics=metrics, diff_loss=diff_loss, eps_scaling=eps)
        out.append((scaled, samples))
    return out


def _finetune(name, seed, cfg, splits, pre, evaluator, adapter, curve, progress, budget=None) -> dict[str, Any]:
    settings = cfg.strategy_settings(name, seed)
    strategy = build_strategy(settings, SCHEDULER_CONFIG, backbone=pre.feature_net)
    unet = adapter.unet
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(seed)  # the same batches for every strategy
    if budget is None:  # curve points after these iterations
        points = set(curve_iterations(cfg.iters, cfg.curve_points))
    else:  # after the iterations that cross these shares of the compute budget
        marks = [budget * (k + 1) / cfg.curve_points for k in range(cfg.curve_points)]
    g_updates, last_logs, sums, it = 0, {}, {}, 0
    while (it < cfg.iters) if budget is None else (strategy.cost_total.forward_equiv < budget):
        it += 1
        spent = strategy.cost_total.forward_equiv
        done = (it - 1) / cfg.iters if budget is None else spent / budget
        unet.train()
        idx = torch.randint(0, len(splits.train_y), (cfg.batch,), generator=data_gen)
        labels = drop_labels(splits.train_y[idx], cfg.label_dropout, data_gen)
        out = strategy(adapter, TrainBatch(splits.train_x[idx], {"labels": labels}))
        if out.updates_generator:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, done) * strategy.latest_generator_lr_factor()
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            g_updates += 1
        last_logs = out.logs
        for k, v in out.logs.items():
            sums[k] = sums.get(k, 0.0) + v
        now = strategy.cost_total.forward_equiv
        if it in points if budget is None else any(spent < m <= now for m in marks):
            unet.eval()
            metrics, _ = evaluator.evaluate(adapter, cfg.train_setting, eval_seed(seed, 0))
            curve.append({"iter": it, "forward_equiv": now, **metrics})
        if progress:
            progress(1)
    return {
        "settings": settings.to_dict(),
        "iterations": it,
        "budget_forward_equiv": budget,
        "generator_updates": g_updates,
        "cost": {**strategy.cost_total.to_dict(), "forward_equiv": strategy.cost_total.forward_equiv,
                 "ft_steps": strategy.cost_total.ft_steps},
        "mean_logs": {k: v / max(1, it) for k, v in sums.items()},
        "last_logs": last_logs,
    }


Job = tuple[int, str, bool]  # (seed, strategy, with ADT's compute)


def demo_jobs(cfg: DemoConfig) -> list[Job]:
    """Every fine-tune (and the base's evaluation), in report order."""
    jobs = [(seed, name, False) for seed in cfg.seeds for name in cfg.strategies]
    jobs += [(seed, name, True) for seed in cfg.seeds for name in cfg.compute_arms]
    return jobs


def adt_budget(records: list[tuple[dict[str, Any], Any]]) -> float:
    """What an ADT run spent (forward-equivalents): the budget of the runs with its compute."""
    return float(records[0][0]["cost"]["forward_equiv"])


def run_demo(
    cfg: DemoConfig,
    splits: DigitSplits,
    pre: Pretrained,
    progress: Optional[Any] = None,
    workers: int = 1,
) -> tuple[list[dict[str, Any]], dict[int, dict[str, dict[str, torch.Tensor]]]]:
    """All runs: (records, samples[seed][arm][setting key]). `progress` is a tqdm-like bar
    over the runs (see `total_runs`). A run with ADT's compute starts when that seed's ADT
    run has finished. With `workers` > 1 the runs are spread over that many processes of one
    thread each; every run seeds itself, so the results are the same as in one process."""
    jobs = demo_jobs(cfg)
    results: dict[Job, list] = {}

    def budget_of(job: Job) -> Optional[float]:
        return adt_budget(results[job[0], "adt", False]) if job[2] else None

    def done(job: Job, result) -> None:
        results[job] = result
        if progress is not None:
            progress.update(1)

    if workers <= 1:
        evaluator = _evaluator(cfg, splits, pre)
        for job in sorted(jobs, key=lambda j: j[2]):  # ADT's compute is known before it is given
            seed, name, _ = job
            if progress is not None:
                progress.set_description(f"seed {seed} {name}{AT_ADT_COMPUTE if job[2] else ''}")
            done(job, run_one(name, seed, cfg, splits, pre, evaluator, budget=budget_of(job)))
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # spawn, not fork: a forked copy of a process that already ran torch's thread pools can hang
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(cfg, splits, pre)) as pool:
            # the longest runs first, so that no process is left with one at the end
            order = {"adt": 0, "at": 1}
            ready = sorted((j for j in jobs if not j[2]), key=lambda j: order.get(j[1], 2))
            waiting = [j for j in jobs if j[2]]
            running = {pool.submit(_run_in_worker, seed, name, None): (seed, name, c) for seed, name, c in ready}
            if progress is not None:
                progress.set_description(f"{len(jobs)} runs on {workers} processes")
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    done(running.pop(future), future.result())
                for job in [j for j in waiting if (j[0], "adt", False) in results]:
                    waiting.remove(job)
                    running[pool.submit(_run_in_worker, job[0], job[1], budget_of(job))] = job
    records, samples = [], {}
    for job in jobs:
        for record, arm_samples in results[job]:
            records.append(record)
            samples.setdefault(job[0], {})[record["arm"]] = arm_samples
    order = {arm: i for i, arm in enumerate(cfg.arms)}
    records.sort(key=lambda r: (order.get(r["arm"], len(order)), cfg.seeds.index(r["seed"])))
    return records, samples


def _evaluator(cfg: DemoConfig, splits: DigitSplits, pre: Pretrained) -> Evaluator:
    n = cfg.eval_images or len(splits.test_y)
    return Evaluator(pre.classifier, splits.test_x[:n], splits.test_y[:n])


_WORKER: dict[str, Any] = {}


def _init_worker(cfg: DemoConfig, splits: DigitSplits, pre: Pretrained) -> None:
    torch.set_num_threads(1)
    _WORKER.update(cfg=cfg, splits=splits, pre=pre, evaluator=_evaluator(cfg, splits, pre))


def _run_in_worker(seed: int, name: str, budget: Optional[float]):
    w = _WORKER
    return run_one(name, seed, w["cfg"], w["splits"], w["pre"], w["evaluator"], budget=budget)


def total_runs(cfg: DemoConfig) -> int:
    return len(demo_jobs(cfg))


def full_config() -> DemoConfig:
    return DemoConfig()


def quick_config() -> DemoConfig:
    """The same study on a small budget (under 2 minutes on 2 CPU cores from an empty cache,
    the base model's training included): fewer iterations, fewer evaluation settings."""
    return replace(
        DemoConfig(),
        iters=50,
        curve_points=2,
        other_settings=(SamplerSetting("ddim", 4, 1.0), SamplerSetting("dpmsolver++", 8, 2.0)),
        eps_factors=(1.0, 1.005, 1.01, 1.02),
        eps_select_images=135,
    )
