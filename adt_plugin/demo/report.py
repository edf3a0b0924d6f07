"""What `adt demo` writes: the summary statistics, a printed / Markdown table,
results.json, a PNG grid of samples and a PNG of metric curves (drawn with PIL)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..fileio import atomic_path, atomic_write_bytes

METRICS = ("fd_pixel", "fd_feature", "accuracy")
LOWER_IS_BETTER = {"fd_pixel": True, "fd_feature": True, "accuracy": False, "diff_loss": True}
METRIC_NAMES = {"fd_pixel": "FD pixel", "fd_feature": "FD classifier", "accuracy": "accuracy", "diff_loss": "held-out diff loss"}
COLORS = {"base": (128, 128, 128), "ft": (31, 119, 180), "adt": (214, 39, 40), "ip": (44, 160, 44), "at": (255, 127, 14)}


def stats(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def _metric(record: Mapping[str, Any], setting: Optional[str], metric: str) -> float:
    return record["diff_loss"] if metric == "diff_loss" else record["metrics"][setting][metric]


def arm_of(record: Mapping[str, Any]) -> str:
    return record.get("arm", record["strategy"])


#: the paired comparisons of the report, the headline first: (key, ADT's arm, the other, title)
PAIRS = (
    ("adt-ft@C", "adt", "ft@C", "equal compute: ADT - FT given ADT's compute"),
    ("adt-ft@C+eps", "adt", "ft@C+eps", "equal compute: ADT - FT given ADT's compute, sampled with epsilon scaling"),
    ("adt-ft", "adt", "ft", "equal iterations: ADT - FT"),
)
#: what a run spent, per arm
COST_FIELDS = {"iterations": "iterations", "forward_equiv": "forward-equivalents", "ft_steps": "in FT steps",
               "train_seconds": "train seconds"}


def _cost_value(record: Mapping[str, Any], field: str) -> float:
    if field == "train_seconds":
        return float(record["train_seconds"])
    if field == "iterations":
        return float(record.get("iterations", 0))
    return float(record.get("cost", {}).get(field, 0.0))


def summarize(records: Sequence[Mapping[str, Any]], settings: Sequence[str], arms: Sequence[str]) -> dict[str, Any]:
    """{"settings": {setting: {arm: {metric: stats}}}, "diff_loss": {arm: stats},
    "cost": {arm: {field: stats}}, "paired": {pair key: {setting: {metric: {per_seed, stats,
    adt_better_seeds}}}} (paired = ADT - the other arm per seed; see `PAIRS`)."""
    by = {(arm_of(r), r["seed"]): r for r in records}
    seeds = sorted({r["seed"] for r in records})
    arms = [a for a in arms if all((a, s) in by for s in seeds)]
    out: dict[str, Any] = {"settings": {}, "diff_loss": {}, "cost": {}, "paired": {}}
    for setting in settings:
        out["settings"][setting] = {
            name: {m: stats([_metric(by[name, s], setting, m) for s in seeds]) for m in METRICS} for name in arms
        }
    for name in arms:
        if "eps_scaling" in by[name, seeds[0]]:  # the factors picked for each setting, per seed
            out.setdefault("eps_factors", {})[name] = {
                k: [by[name, s]["eps_scaling"]["factors"][k] for s in seeds] for k in settings
            }
    for name in arms:
        out["diff_loss"][name] = stats([by[name, s]["diff_loss"] for s in seeds])
        out["cost"][name] = {f: stats([_cost_value(by[name, s], f) for s in seeds]) for f in COST_FIELDS}
    for key, a, b, _ in PAIRS:
        if a not in arms or b not in arms:
            continue
        pair: dict[str, Any] = {}
        for setting in [*settings, None]:
            metrics = ("diff_loss",) if setting is None else METRICS
            block = {}
            for m in metrics:
                diffs = [_metric(by[a, s], setting, m) - _metric(by[b, s], setting, m) for s in seeds]
                better = sum((d < 0) if LOWER_IS_BETTER[m] else (d > 0) for d in diffs)
                block[m] = {"per_seed": dict(zip(map(str, seeds), diffs)), **stats(diffs), "adt_better_seeds": better}
            pair["heldout" if setting is None else setting] = block
        out["paired"][key] = pair
    return out


def _pm(s: Mapping[str, Any], digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def tables(summary: Mapping[str, Any], labels: Mapping[str, str], arms: Sequence[str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) blocks shared by the printed and the Markdown table: the paired
    comparisons (equal compute first), the metrics per setting, what each arm spent."""
    blocks = []
    arms = [a for a in arms if a in summary["diff_loss"]]
    titles = {key: title for key, _, _, title in PAIRS}
    for key, pair in summary["paired"].items():
        header = ["setting", "metric", "per seed", "mean ± std", "ADT better"]
        rows = []
        for setting, block in pair.items():
            for m, d in block.items():
                per_seed = ", ".join(f"{v:+.3f}" for v in d["per_seed"].values())
                rows.append([labels.get(setting, setting), METRIC_NAMES[m], per_seed, f"{d['mean']:+.3f} ± {d['std']:.3f}", f"{d['adt_better_seeds']}/{d['n']}"])
        blocks.append((f"{titles[key]} (same seed: same data order and sampling noise)", header, rows))
    first = True
    for setting, per in summary["settings"].items():
        header = ["arm", *(METRIC_NAMES[m] for m in METRICS)]
        if first:
            header.append(METRIC_NAMES["diff_loss"])
        rows = []
        for name in arms:
            row = [name, *(_pm(per[name][m], 3 if m == "accuracy" else 2) for m in METRICS)]
            if first:
                row.append(_pm(summary["diff_loss"][name], 4))
            rows.append(row)
        title = f"{labels.get(setting, setting)}" + (" (the setting trained for)" if first else "")
        blocks.append((title, header, rows))
        first = False
    header = ["arm", *COST_FIELDS.values()]
    rows = [[name, *(f"{summary['cost'][name][f]['mean']:.{0 if f != 'train_seconds' else 1}f}" for f in COST_FIELDS)]
            for name in arms if name in summary["cost"]]
    blocks.append(("compute per run (mean over seeds; denoiser forward-equivalents, an FT step = 3)", header, rows))
    if summary.get("eps_factors"):
        header = ["arm", "setting", "factor per seed"]
        rows = [[name, labels.get(k, k), ", ".join(f"{f:g}" for f in per_seed)]
                for name, per in summary["eps_factors"].items() for k, per_seed in per.items()]
        blocks.append(("epsilon scaling: the factor picked on the fine-tuning images (1 = no scaling)", header, rows))
    return blocks


def format_text(blocks) -> str:
    lines = []
    for title, header, rows in blocks:
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
        lines.append(title)
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines.extend("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)
        lines.append("")
    return "\n".join(lines)


def format_markdown(blocks, preamble: str = "") -> str:
    lines = [preamble] if preamble else []
    for title, header, rows in blocks:
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=1, default=_jsonable) + "\n").encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _tile(images: torch.Tensor, scale: int) -> Image.Image:
    """[N, 1, H, W] in [-1, 1] -> one row of N images, each upscaled `scale` times."""
    row = torch.cat(list(images[:, 0]), dim=1)
    pixels = ((row.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    img = Image.fromarray(pixels, mode="L")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def sample_grid(
    columns: Mapping[str, torch.Tensor], labels: torch.Tensor, per_cell: int = 4, scale: int = 4, num_classes: int = 10
) -> Image.Image:
    """Rows = classes, columns = strategies (plus anything else in `columns`, e.g. held-out
    real digits); each cell holds the first `per_cell` images of that class."""
    font = _font(12)
    cell_w, cell_h, pad, left, top = per_cell * 8 * scale, 8 * scale, 6, 24, 22
    width = left + len(columns) * (cell_w + pad)
    height = top + num_classes * (cell_h + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, (name, images) in enumerate(columns.items()):
        x = left + j * (cell_w + pad)
        draw.text((x + 2, 4), name, fill=(0, 0, 0), font=font)
        for c in range(num_classes):
            picked = images[labels == c][:per_cell]
            if len(picked):
                canvas.paste(_tile(picked, scale).convert("RGB"), (x, top + c * (cell_h + pad)))
    for c in range(num_classes):
        draw.text((6, top + c * (cell_h + pad) + cell_h // 2 - 6), str(c), fill=(0, 0, 0), font=font)
    return canvas


def curves_image(
    curves: Mapping[str, Sequence[tuple[int, Mapping[str, float]]]],
    metrics: Iterable[str] = ("fd_pixel", "fd_feature", "accuracy"),
    title: str = "",
    size: tuple[int, int] = (330, 240),
) -> Image.Image:
    """One panel per metric: mean over seeds against compute (forward-equivalents), one line per arm."""
    metrics = list(metrics)
    font = _font(11)
    pw, ph = size
    canvas = Image.new("RGB", (pw * len(metrics), ph + 40), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((8, 4), title, fill=(0, 0, 0), font=font)
    for k, metric in enumerate(metrics):
        ox, oy = k * pw, 22
        x0, y0, x1, y1 = ox + 44, oy + 18, ox + pw - 10, oy + ph - 28
        points = {n: [(it, m[metric]) for it, m in pts] for n, pts in curves.items() if pts}
        values = [v for pts in points.values() for _, v in pts]
        iters = [it for pts in points.values() for it, _ in pts]
        if not values:
            continue
        lo, hi = min(values), max(values)
        if math.isclose(lo, hi):
            lo, hi = lo - 0.5, hi + 0.5
        lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
        imax = max(iters) or 1

        def xy(it, v):
            return x0 + (x1 - x0) * it / imax, y1 - (y1 - y0) * (v - lo) / (hi - lo)

        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((x0, oy + 2), METRIC_NAMES.get(metric, metric), fill=(0, 0, 0), font=font)
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            y = y1 - frac * (y1 - y0)
            draw.line([x0 - 3, y, x0, y], fill=(0, 0, 0))
            draw.text((ox + 2, y - 6), f"{v:.2f}", fill=(0, 0, 0), font=font)
        for frac in (0.0, 0.5, 1.0):
            x = x0 + frac * (x1 - x0)
            draw.text((x - 8, y1 + 4), f"{round(frac * imax)}", fill=(0, 0, 0), font=font)
        draw.text(((x0 + x1) / 2 - 60, y1 + 14), "compute (forward-equivalents)", fill=(0, 0, 0), font=font)
        for j, (name, pts) in enumerate(points.items()):
            color = COLORS.get(name.split("@")[0].split("+")[0], (0, 0, 0))
            dashed = "@" in name
            line = [xy(it, v) for it, v in pts]
            if len(line) > 1:
                draw.line(line, fill=color, width=1 if dashed else 2)
            for px, py in line:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
            if k == 0:
                draw.text((x1 - 48, y0 + 4 + 12 * j), name, fill=color, font=font)
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def mean_curves(records: Sequence[Mapping[str, Any]], arms: Sequence[str], train_key: str) -> dict[str, list]:
    """{arm: [(forward-equivalents, {metric: mean over seeds})]}, the k-th point of every seed
    averaged (a run's points sit at the same shares of its budget), starting from the base
    model at 0 (every fine-tune starts there); base itself is a flat line to the largest budget."""
    seeds = sorted({r["seed"] for r in records})
    by = {(arm_of(r), r["seed"]): r for r in records}
    base = {}
    if all(("base", s) in by for s in seeds):
        base = {m: statistics.fmean(by["base", s]["metrics"][train_key][m] for s in seeds) for m in METRICS}
    curves: dict[str, list] = {}
    for name in arms:
        if name == "base" or not all((name, s) in by for s in seeds) or not by[name, seeds[0]]["curve"]:
            continue
        runs = [by[name, s]["curve"] for s in seeds]
        line = [(0, base)] if base else []
        for points in zip(*runs):
            line.append((statistics.fmean(p["forward_equiv"] for p in points), {m: statistics.fmean(p[m] for p in points) for m in METRICS}))
        curves[name] = line
    if base and curves:
        curves = {"base": [(0, base), (max(x for line in curves.values() for x, _ in line), base)], **curves}
    return curves


def write_outputs(out: Path, cfg, records, samples, splits, meta: Mapping[str, Any]) -> str:
    """results.json, table.md, samples.png, curves.png; returns the printed table."""
    keys = [s.key for s in cfg.eval_settings]
    labels = {s.key: s.label for s in cfg.eval_settings}
    labels["heldout"] = "held-out set"
    summary = summarize(records, keys, cfg.arms)
    blocks = tables(summary, labels, cfg.arms)
    text = format_text(blocks)
    write_json(out / "results.json", {"config": cfg.to_dict(), **meta, "summary": summary, "runs": list(records)})
    preamble = (
        f"# adt demo results\n\nDigits, shift `{splits.shift}`; {len(cfg.seeds)} seeds ({', '.join(map(str, cfg.seeds))}); "
        f"{cfg.iters} fine-tuning iterations of batch {cfg.batch} per strategy and seed; trained for "
        f"{cfg.train_setting.label}. `@C`: the same strategy given ADT's compute instead of its iterations "
        f"(per seed, it runs until its denoiser forward-equivalents reach what ADT spent); `+eps`: the same FT "
        f"model sampled with epsilon scaling (factor picked per setting on the fine-tuning images). "
        f"Frechet distances against the {len(splits.test_y)} held-out target digits "
        f"(lower is better); accuracy of the separate classifier on the samples; mean ± standard deviation over seeds. "
        f"Wall time {meta['wall_seconds']:.0f}s.\n"
    )
    atomic_write_bytes(out / "table.md", format_markdown(blocks, preamble).encode())
    first_seed = cfg.seeds[0]
    train_key = cfg.train_setting.key
    columns = {name: samples[first_seed][name][train_key] for name in cfg.arms if name in samples[first_seed]}
    n = len(next(iter(columns.values())))  # samples are made for the first n held-out labels
    columns["held-out"] = splits.test_x[:n]
    save_png(sample_grid(columns, splits.test_y[:n]), out / "samples.png")
    curves = mean_curves(records, cfg.arms, train_key)
    title = f"{cfg.train_setting.label}: mean over seeds {', '.join(map(str, cfg.seeds))}"
    save_png(curves_image(curves, title=title), out / "curves.png")
    return text
