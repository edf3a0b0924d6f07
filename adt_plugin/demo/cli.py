"""`adt demo`: base vs ft vs adt vs ip vs at on real data (scikit-learn digits), on a CPU."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

HELP = "fine-tune a small digits diffusion model with base / ft / adt / ip / at and compare what the sampler produces"

EPILOG = """\
examples:
  adt demo --quick                      a small budget (under 2 minutes on 2 CPU cores)
  adt demo --equal-compute ft           only FT gets ADT's compute besides its iterations
  adt demo --seeds 0 1 2 3 4 --out runs/demo
  adt demo --set adv_balance=none --set reference=self --set lambda_diff=0.5
                                        the paper's formulation taken literally
Every strategy runs for the same iterations; FT, IP and AT also run with ADT's compute
(`@C`: per seed, until their denoiser forward-equivalents reach ADT's), and FT is also
sampled with epsilon scaling (`+eps`). The report leads with ADT against FT at equal compute.
Outputs in --out: results.json (every metric, and the compute, per run), table.md,
samples.png (rows = digits, columns = runs), curves.png (metrics against compute).
Base models are cached (--cache-dir, default $ADT_CACHE_DIR or ~/.cache/adt-plugin) and
retrained whenever a setting that shapes them changes."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--quick", action="store_true", help="small budget: fewer iterations and evaluation settings")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run seeds (default 0 1 2)")
    parser.add_argument("--out", default="adt-demo", help="output folder (default ./adt-demo)")
    parser.add_argument("--strategies", nargs="+", default=None, help="subset of base ft adt ip at")
    parser.add_argument("--iters", type=int, default=None, help="fine-tuning iterations per strategy and seed")
    parser.add_argument(
        "--equal-compute",
        nargs="+",
        default=None,
        metavar="STRATEGY",
        help="strategies that also run with ADT's compute (default: ft ip at; 'none': no such runs)",
    )
    parser.add_argument(
        "--train-setting",
        default=None,
        metavar="SAMPLER,STEPS,CFG",
        help="the sampler the fine-tune is for (ADT's rollout), e.g. ddim,4,2",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an ADT setting for the core strategies (any AdtSettings field; value as JSON or a bare string)",
    )
    parser.add_argument("--cache-dir", default=None, help="where cached base models live")
    parser.add_argument("--no-cache", action="store_true", help="retrain the base model and helper networks")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these 8x8 models gain little from more, and a busy machine makes them slower)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes for the fine-tuning runs (default: one per CPU core, at most 4; the results do not depend on it)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def build_config(args: argparse.Namespace):
    from .experiment import DemoConfig, full_config, quick_config
    from .metrics import SamplerSetting

    cfg: DemoConfig = quick_config() if args.quick else full_config()
    changes = {}
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    if args.strategies:
        unknown = [s for s in args.strategies if s not in ("base", "ft", "adt", "ip", "at")]
        if unknown:
            raise SystemExit(f"unknown strategies {unknown}; choose from base ft adt ip at")
        changes["strategies"] = tuple(args.strategies)
    if args.iters is not None:
        changes["iters"] = args.iters
    if args.equal_compute is not None:
        names = () if args.equal_compute == ["none"] else tuple(args.equal_compute)
        unknown = [s for s in names if s not in ("ft", "ip", "at")]
        if unknown:
            raise SystemExit(f"--equal-compute: unknown strategies {unknown}; choose from ft ip at, or none")
        changes["equal_compute"] = names
    if args.train_setting:
        try:
            sampler, steps, guidance = args.train_setting.split(",")
            changes["train_setting"] = SamplerSetting(sampler, int(steps), float(guidance))
        except ValueError:
            raise SystemExit(f"--train-setting expects SAMPLER,STEPS,CFG such as ddim,4,2; got {args.train_setting!r}")
    if args.overrides:
        changes["adt"] = {**cfg.adt, **parse_overrides(args.overrides)}
    cfg = replace(cfg, **changes)
    from ..settings import SettingsError

    try:  # fail now, naming the key, not after the base model has trained
        for name in cfg.strategies:
            if name != "base":
                cfg.strategy_settings(name, cfg.seeds[0])
    except SettingsError as err:
        raise SystemExit(f"adt demo: {err}")
    return cfg


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_config(args)
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    if workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {workers}")
    execute(
        cfg, Path(args.out), args.cache_dir, cache=not args.no_cache, progress=not args.no_progress, quick=args.quick,
        workers=workers,
    )
    return 0


def execute(
    cfg, out: Path, cache_dir=None, cache: bool = True, progress: bool = True, quick: bool = False, workers: int = 1
) -> dict:
    """Pre-train (or reuse), fine-tune every strategy for every seed, evaluate, write the outputs."""
    import torch
    from tqdm.auto import tqdm

    from .data import make_splits
    from .experiment import run_demo, total_runs
    from .pretrain import ModelCache, pretrain
    from .report import write_outputs

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits = make_splits()
    model_cache = ModelCache(cache_dir, enabled=cache)
    print(
        f"adt demo{' --quick' if quick else ''}: digits, base split {len(splits.base_y)}, "
        f"{splits.shift} target train {len(splits.train_y)} / held-out test {len(splits.test_y)}; "
        f"strategies {' '.join(cfg.strategies)}; seeds {' '.join(map(str, cfg.seeds))}; "
        f"{cfg.iters} iterations each" + (f", and {' '.join(cfg.compute_arms)} with ADT's compute" if cfg.compute_arms else "")
        + f"; trained for {cfg.train_setting.label}; cache {model_cache.root}"
    )
    t0 = time.perf_counter()
    pre = pretrain(splits, cfg.pretrain, model_cache, progress=progress)
    pretrain_seconds = time.perf_counter() - t0
    reused = [k for k, hit in pre.cached.items() if hit]
    print(f"base model and helper networks ready in {pretrain_seconds:.0f}s" + (f" (cached: {', '.join(reused)})" if reused else ""))

    with tqdm(total=total_runs(cfg), disable=not progress, dynamic_ncols=True, unit="run") as bar:
        records, samples = run_demo(cfg, splits, pre, bar, workers=workers)
    wall = time.perf_counter() - start
    meta = {
        "wall_seconds": wall,
        "pretrain_seconds": pretrain_seconds,
        "pretrain_cached": pre.cached,
        "splits": splits.sizes(),
        "shift": splits.shift,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "workers": workers,
            "cpu_count": os.cpu_count(),
        },
    }
    text = write_outputs(out, cfg, records, samples, splits, meta)
    print(text)
    print(f"wall time {wall:.0f}s; wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'samples.png'}, {out / 'curves.png'}")
    return meta
