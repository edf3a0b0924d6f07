"""The ADT study on the digits demo: ADT variants against FT at equal compute, per seed, paired.

    python benchmarks/demo_study.py                                # the compute study, seeds 0 1 2
    python benchmarks/demo_study.py --variants mix4 k0 --seeds 0 1 2 3 4 --workers 2
    python benchmarks/demo_study.py --list

Every variant fine-tunes the same cached base model on the same batches as FT (same seed),
through the core's strategies, and is evaluated with the same sampling noise. Per variant
and seed, FT is then given exactly that ADT run's compute (it runs until its denoiser
forward-equivalents reach ADT's: `ft@<variant>`), and its samples are also taken with
epsilon scaling (`+eps`, the factor picked on the fine-tuning images). FT at the demo's
iterations (`ft`) is the equal-iterations reference. The tables show, per sampler setting,
FD per seed, ADT - FT at equal compute per seed, accuracy and what each run spent.
Results go to --out as JSON (one file per run), so an interrupted study resumes where it
stopped; `--workers` spreads the runs over processes of one thread each (same results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

# The variants: AdtSettings overrides on top of the demo's (DemoConfig.adt, which sits on the core's defaults).
VARIANTS: dict[str, dict] = {
    "default": {},
    # --- what an ADT step costs and how often it comes (issue 10) ---
    # the default before the compute study: an ADT step every iteration, K = 3 (every step of DDIM 4 keeps a graph)
    "every_k3": {"adt_every": 1, "k_graph_steps": 3, "rollout_buffer": 0, "rollout_share": 1.0},
    "every_k1": {"adt_every": 1, "k_graph_steps": 1, "rollout_buffer": 0, "rollout_share": 1.0},
    "every_k0": {"adt_every": 1, "k_graph_steps": 0, "rollout_buffer": 0, "rollout_share": 1.0},
    "mix2_k0": {"adt_every": 2, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 1.0},
    "mix4_k0": {"adt_every": 4, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 1.0},
    "mix4_k0_nobuffer": {"adt_every": 4, "k_graph_steps": 0, "rollout_buffer": 0, "rollout_share": 1.0},
    "mix4_k0_ratio1": {"adt_every": 4, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 1.0, "adv_ratio": 1.0},
    "mix4_k3": {"adt_every": 4, "k_graph_steps": 3, "rollout_buffer": 1, "rollout_share": 1.0},
    "share25_k0": {"adt_every": 1, "k_graph_steps": 0, "rollout_buffer": 0, "rollout_share": 0.25},
    "share25_mix2_k0": {"adt_every": 2, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 0.25},
    "phase_k0": {"adt_every": 1, "adt_start": 200, "k_graph_steps": 0, "rollout_buffer": 0, "rollout_share": 1.0},
    "share25_mix2_k0_ratio1": {"adt_every": 2, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 0.25,
                               "adv_ratio": 1.0},
    "share25_mix4_k0_ratio1": {"adt_every": 4, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 0.25,
                               "adv_ratio": 1.0},
    "share12_mix4_k0_ratio1": {"adt_every": 4, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 0.125,
                               "adv_ratio": 1.0},
    "share25_mix8_k0_ratio1": {"adt_every": 8, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 0.25,
                               "adv_ratio": 1.0},
    "share25_mix4_k0_ratio3": {"adt_every": 4, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 0.25,
                               "adv_ratio": 3.0},
    "share25_k0_ratio1": {"adt_every": 1, "k_graph_steps": 0, "rollout_buffer": 0, "rollout_share": 0.25, "adv_ratio": 1.0},
    # the default (the core's) with the diffusion term at FT's weight on the ADT steps, and with half the ratio
    "default_lambda1": {"lambda_diff": 1.0},
    "default_lambda2": {"lambda_diff": 2.0},
    "default_ratio05": {"adv_ratio": 0.5},
    # the control: the mix without the adversarial term (FT with ADT's draws and rollouts)
    "mix4_k0_control": {"adt_every": 4, "k_graph_steps": 0, "rollout_buffer": 1, "rollout_share": 1.0, "adv_ratio": 0.0},
    # --- the formulation (the equal-iterations study before; see docs/demo.md) ---
    # the paper's formulation: siamese D, L_adv + 0.5 L_diff at t_s, scored against the noised image itself
    "paper": {"discriminator": "siamese", "adv_balance": "none", "lambda_diff": 0.5, "reference": "self",
              "diff_timestep": "start", "adt_every": 1, "k_graph_steps": 3},
    "diff_start": {"diff_timestep": "start"},  # the diffusion term only at the rollout's start steps (the paper)
    "no_adversarial": {"adv_ratio": 0.0},  # the control: FT with ADT's random draws
    "siamese": {"discriminator": "siamese"},  # the core's default discriminator (same_cond reference)
    "ratio_1": {"adv_ratio": 1.0},
    "h5": {"g_every": 5},
}
STUDY = ["mix4_k0", "mix2_k0", "share25_mix2_k0", "phase_k0", "mix4_k0_ratio1", "mix4_k0_nobuffer", "mix4_k0_control",
         "share25_k0", "mix4_k3", "every_k0", "every_k1", "every_k3"]


def run_file(out: Path, label: str, seed: int, iters: int) -> Path:
    return out / f"{label}-seed{seed}-iters{iters}.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=STUDY)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/out/demo_study")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="processes (one thread each); the results do not depend on it")
    parser.add_argument("--report-only", action="store_true", help="print the tables from the runs on disk, run nothing")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, changes in VARIANTS.items():
            print(f"{name:18} {changes}")
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; --list shows them")

    import torch

    from adt_plugin.demo.experiment import full_config

    torch.set_num_threads(args.threads)
    cfg = full_config()
    if args.iters:
        cfg = replace(cfg, iters=args.iters)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_study(cfg, args, out)
    results = load_results(out, cfg, args.variants, args.seeds)
    print()
    print(format_study(results, cfg, args.seeds, args.variants))
    return 0


def _job(cfg, label, name, changes, seed, budget):
    from adt_plugin.demo.experiment import run_one

    w = _WORKER
    variant_cfg = replace(cfg, adt={**cfg.adt, **changes})
    start = time.perf_counter()
    runs = run_one(name, seed, variant_cfg, w["splits"], w["pre"], w["evaluator"], budget=budget)
    for record, _ in runs:
        record["wall_seconds"] = time.perf_counter() - start
        record["changes"] = changes
        record["study_label"] = label + record["arm"][len(name) + (len("@C") if budget is not None else 0):]
    return [record for record, _ in runs]


_WORKER: dict = {}


def _init(cfg, cache_dir, threads):
    import torch

    from adt_plugin.demo.data import make_splits
    from adt_plugin.demo.experiment import _evaluator
    from adt_plugin.demo.pretrain import ModelCache, pretrain

    torch.set_num_threads(threads)
    splits = make_splits()
    pre = pretrain(splits, cfg.pretrain, ModelCache(cache_dir), progress=False)
    _WORKER.update(splits=splits, pre=pre, evaluator=_evaluator(cfg, splits, pre))


def run_study(cfg, args, out: Path) -> None:
    """Run what is not on disk yet: FT at the demo's iterations, each variant, then FT with
    that variant's compute (per seed, once the variant's run is there)."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    import multiprocessing

    _init(cfg, args.cache_dir, args.threads)  # trains (or loads) the cached base once, before the workers
    pending = [("ft", "ft", {}, seed, None) for seed in args.seeds]
    pending += [(v, "adt", VARIANTS[v], seed, None) for v in args.variants for seed in args.seeds]
    followers = [(f"ft@{v}", "ft", {}, seed, v) for v in args.variants for seed in args.seeds]

    def saved(label, seed):
        return run_file(out, label, seed, cfg.iters).exists()

    def save(records):
        for record in records:
            label = record["study_label"]
            run_file(out, label, record["seed"], cfg.iters).write_text(json.dumps(record, indent=1))
            m = record["metrics"][cfg.train_setting.key]
            print(f"{label:24} seed {record['seed']}: FD pixel {m['fd_pixel']:.3f}  FD classifier {m['fd_feature']:.3f}  "
                  f"accuracy {m['accuracy']:.3f}  compute {record['cost']['forward_equiv']:.0f}  "
                  f"({record['wall_seconds']:.0f}s)", flush=True)

    def budget_of(variant, seed):
        return json.loads(run_file(out, variant, seed, cfg.iters).read_text())["cost"]["forward_equiv"]

    todo = [j for j in pending if not saved(j[0], j[3])]
    waiting = [j for j in followers if not saved(j[0], j[3])]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, args.workers), mp_context=context, initializer=_init,
                             initargs=(cfg, args.cache_dir, args.threads)) as pool:
        running = {}

        def submit_ready():
            for job in [j for j in waiting if saved(j[4], j[3])]:
                waiting.remove(job)
                label, name, changes, seed, variant = job
                running[pool.submit(_job, cfg, label, name, changes, seed, budget_of(variant, seed))] = job
            while todo and len(running) < 2 * max(1, args.workers):
                label, name, changes, seed, _ = todo.pop(0)
                running[pool.submit(_job, cfg, label, name, changes, seed, None)] = (label, name, changes, seed, None)

        submit_ready()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                running.pop(future)
                save(future.result())
            submit_ready()


def load_results(out: Path, cfg, variants, seeds) -> dict[str, dict[int, dict]]:
    results: dict[str, dict[int, dict]] = {}
    labels = ["ft", *[x for v in variants for x in (v, f"ft@{v}", f"ft@{v}+eps")]]
    for label in labels:
        for seed in seeds:
            path = run_file(out, label, seed, cfg.iters)
            if path.exists():
                results.setdefault(label, {})[seed] = json.loads(path.read_text())
    return results


def format_study(results, cfg, seeds, variants) -> str:
    """Per setting: for each variant, ADT and FT at its compute per seed, ADT - FT per seed."""
    lines = []
    complete = [v for v in variants if all(s in results.get(v, {}) and s in results.get(f"ft@{v}", {}) for s in seeds)]
    missing = [v for v in variants if v not in complete]
    if missing:
        lines.append(f"(not complete for seeds {seeds}: {', '.join(missing)})\n")
    lines.append("## compute (mean over seeds; forward-equivalents, an FT step = 3)")
    lines.append("| variant | ADT iterations | ADT compute | per iteration, in FT steps | FT iterations at that compute | ADT train s | FT@C train s |")
    lines.append("|---|---|---|---|---|---|---|")
    for v in complete:
        a, f = results[v], results[f"ft@{v}"]
        spent = statistics.fmean(a[s]["cost"]["forward_equiv"] for s in seeds)
        iters = statistics.fmean(a[s]["iterations"] for s in seeds)
        lines.append(
            f"| {v} | {iters:.0f} | {spent:.0f} | {spent / iters / 3:.2f} | "
            f"{statistics.fmean(f[s]['iterations'] for s in seeds):.0f} | "
            f"{statistics.fmean(a[s]['train_seconds'] for s in seeds):.0f} | {statistics.fmean(f[s]['train_seconds'] for s in seeds):.0f} |"
        )
    lines.append("")
    for setting in cfg.eval_settings:
        key = setting.key
        lines.append(f"## {setting.label}" + (" (trained for)" if setting == cfg.train_setting else ""))
        lines.append("| variant | FD pixel: ADT per seed (ADT - FT@C) | better | FD classifier: ADT per seed (ADT - FT@C) | better "
                     "| accuracy ADT / FT@C | ADT - FT@C+eps: pixel, classifier (better) |")
        lines.append("|---|---|---|---|---|---|---|")
        if "ft" in results and all(s in results["ft"] for s in seeds):
            ft = results["ft"]
            px = [ft[s]["metrics"][key]["fd_pixel"] for s in seeds]
            fe = [ft[s]["metrics"][key]["fd_feature"] for s in seeds]
            acc = statistics.fmean(ft[s]["metrics"][key]["accuracy"] for s in seeds)
            lines.append(f"| ft ({cfg.iters} iterations) | {', '.join(f'{v:.2f}' for v in px)} (mean {statistics.fmean(px):.2f}) | | "
                         f"{', '.join(f'{v:.2f}' for v in fe)} (mean {statistics.fmean(fe):.2f}) | | {acc:.3f} | |")
        for v in complete:
            a, f = results[v], results[f"ft@{v}"]
            e = results.get(f"ft@{v}+eps", {})

            def m(run, s, k):
                return run[s]["metrics"][key][k]

            cells = []
            for k in ("fd_pixel", "fd_feature"):
                d = [m(a, s, k) - m(f, s, k) for s in seeds]
                cells.append(", ".join(f"{m(a, s, k):.2f} ({x:+.2f})" for s, x in zip(seeds, d)))
                cells.append(f"{sum(x < 0 for x in d)}/{len(d)}, mean {statistics.fmean(d):+.2f}")
            acc_a = statistics.fmean(m(a, s, "accuracy") for s in seeds)
            acc_f = statistics.fmean(m(f, s, "accuracy") for s in seeds)
            eps = ""
            if all(s in e for s in seeds):
                dp = [m(a, s, "fd_pixel") - m(e, s, "fd_pixel") for s in seeds]
                df = [m(a, s, "fd_feature") - m(e, s, "fd_feature") for s in seeds]
                eps = (f"{statistics.fmean(dp):+.2f} ({sum(x < 0 for x in dp)}/{len(dp)}), "
                       f"{statistics.fmean(df):+.2f} ({sum(x < 0 for x in df)}/{len(df)})")
            lines.append(f"| {v} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {acc_a:.3f} / {acc_f:.3f} | {eps} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
