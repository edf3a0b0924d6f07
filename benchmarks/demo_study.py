"""The ADT study on the digits demo: FT against ADT variants, per seed, paired.

    python benchmarks/demo_study.py                       # every variant, seeds 0 1 2
    python benchmarks/demo_study.py --variants paper default --seeds 0 1 2 3 4
    python benchmarks/demo_study.py --list

Every variant fine-tunes the same cached base model on the same batches as FT (same
seed), through the core's strategies, and is evaluated with the same sampling noise;
the table shows per-seed Frechet distances at the sampler settings trained for and
at the others, and ADT - FT per seed. Results go to --out as JSON (one file per
variant and seed, so an interrupted study resumes where it stopped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

# The variants: AdtSettings overrides on top of the demo's defaults (DemoConfig.adt).
VARIANTS: dict[str, dict] = {
    "default": {},
    # the paper's formulation: siamese D, L_adv + 0.5 L_diff at t_s, scored against the noised image itself
    "paper": {"discriminator": "siamese", "adv_balance": "none", "lambda_diff": 0.5, "reference": "self", "diff_timestep": "start"},
    "paper_h5": {"discriminator": "siamese", "adv_balance": "none", "lambda_diff": 0.5, "reference": "self",
                 "diff_timestep": "start", "g_every": 5},
    # one change at a time away from the default
    "diff_start": {"diff_timestep": "start"},  # the diffusion term only at the rollout's start steps (the paper)
    "no_adversarial_start": {"adv_ratio": 0.0, "diff_timestep": "start"},  # ... and nothing else
    # the control: no adversarial term, diffusion term at FT's timesteps = FT with ADT's random draws
    "no_adversarial": {"adv_ratio": 0.0},
    "siamese": {"discriminator": "siamese"},  # the core's default discriminator (same_cond reference)
    "siamese_start": {"discriminator": "siamese", "diff_timestep": "start"},
    "siamese_self": {"discriminator": "siamese", "reference": "self"},
    "ratio_1": {"adv_ratio": 1.0},
    "ratio_0.1": {"adv_ratio": 0.1},
    "augment_paper": {"augment": "color,translation,cutout"},
    "h5": {"g_every": 5},
    "lambda_100": {"adv_balance": "none", "lambda_diff": 100.0},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/out/demo_study")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, changes in VARIANTS.items():
            print(f"{name:16} {changes}")
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list shows them")

    import torch

    from adt_plugin.demo.data import make_splits
    from adt_plugin.demo.experiment import full_config, run_one
    from adt_plugin.demo.metrics import Evaluator
    from adt_plugin.demo.pretrain import ModelCache, pretrain

    torch.set_num_threads(args.threads)
    cfg = full_config()
    if args.iters:
        cfg = replace(cfg, iters=args.iters)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits()
    pre = pretrain(splits, cfg.pretrain, ModelCache(args.cache_dir), progress=True)
    evaluator = Evaluator(pre.classifier, splits.test_x, splits.test_y)
    runs = [("ft", "ft", {})] + [(v, "adt", VARIANTS[v]) for v in args.variants]
    results: dict[str, dict[int, dict]] = {}
    for label, strategy, changes in runs:
        variant_cfg = replace(cfg, adt={**cfg.adt, **changes})
        for seed in args.seeds:
            path = out / f"{label}-seed{seed}-iters{cfg.iters}.json"
            if path.exists():
                record = json.loads(path.read_text())
            else:
                start = time.perf_counter()
                record, _ = run_one(strategy, seed, variant_cfg, splits, pre, evaluator)
                record["wall_seconds"] = time.perf_counter() - start
                record["changes"] = changes
                path.write_text(json.dumps(record, indent=1))
            results.setdefault(label, {})[seed] = record
            m = record["metrics"][cfg.train_setting.key]
            print(f"{label:16} seed {seed}: FD pixel {m['fd_pixel']:.3f}  FD classifier {m['fd_feature']:.3f}  "
                  f"accuracy {m['accuracy']:.3f}  ({record.get('wall_seconds', 0):.0f}s)", flush=True)
    print()
    print(format_study(results, cfg, args.seeds))
    return 0


def format_study(results, cfg, seeds) -> str:
    lines = []
    for setting in cfg.eval_settings:
        key = setting.key
        lines.append(f"## {setting.label}" + (" (trained for)" if setting == cfg.train_setting else ""))
        lines.append("| variant | FD pixel per seed | mean | FD classifier per seed | mean | ADT-FT pixel | ADT-FT classifier | accuracy |")
        lines.append("|---|---|---|---|---|---|---|---|")
        ft = results["ft"]
        for label, per_seed in results.items():
            px = [per_seed[s]["metrics"][key]["fd_pixel"] for s in seeds]
            fe = [per_seed[s]["metrics"][key]["fd_feature"] for s in seeds]
            acc = statistics.fmean(per_seed[s]["metrics"][key]["accuracy"] for s in seeds)
            if label == "ft":
                dpx = dfe = "-"
            else:
                d1 = [p - ft[s]["metrics"][key]["fd_pixel"] for p, s in zip(px, seeds)]
                d2 = [f - ft[s]["metrics"][key]["fd_feature"] for f, s in zip(fe, seeds)]
                dpx = f"{statistics.fmean(d1):+.2f} ({sum(d < 0 for d in d1)}/{len(d1)} better)"
                dfe = f"{statistics.fmean(d2):+.2f} ({sum(d < 0 for d in d2)}/{len(d2)} better)"
            lines.append(
                f"| {label} | {', '.join(f'{v:.2f}' for v in px)} | {statistics.fmean(px):.2f} | "
                f"{', '.join(f'{v:.2f}' for v in fe)} | {statistics.fmean(fe):.2f} | {dpx} | {dfe} | {acc:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
