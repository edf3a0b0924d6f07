"""The `adt eval` report: a Table-1-style Markdown table, the same data as JSON,
and a bar chart. Every number is printed with how it was computed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from ..fileio import atomic_write_bytes
from .chart import bar_chart
from .images import save_png
from .scores import METRICS, MetricInfo, mean_std_text
from .suite import EvalResult

# Table 1 of the paper reports FID / HPS / AES; the rest follow.
COLUMN_ORDER = ["fid", "kid", "fd_dinov2", "kid_dinov2", "hps", "aesthetic", "clip", "disc"]
PER_IMAGE = ["hps", "aesthetic", "clip", "disc"]


def _info(metric: str) -> MetricInfo:
    return METRICS.get(metric, MetricInfo(metric, True))


def _fmt(metric: str, value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else _info(metric).fmt.format(value)


def table_values(result: EvalResult, models: Sequence[str]) -> dict[str, dict[str, float]]:
    """metric -> model -> the number in the table (set metric, or per-image mean)."""
    values: dict[str, dict[str, float]] = {}
    for metric in COLUMN_ORDER:
        if metric in result.set_metrics:
            values[metric] = dict(result.set_metrics[metric])
        elif metric in result.table.metrics():
            values[metric] = {m: result.table.summary(metric, m).mean for m in models}
    return values


def win_rate_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    """Each later model over each earlier one: (ft, base), (adt, base), (adt, ft)."""
    return [(models[j], models[i]) for j in range(len(models)) for i in range(j)]


def markdown(result: EvalResult, models: Sequence[str], model_descriptions: Mapping[str, str], settings: Mapping) -> str:
    values = table_values(result, models)
    columns = list(values)
    lines = ["# adt eval", ""]
    lines += [f"- **{m}**: `{model_descriptions.get(m, m)}`" for m in models]
    lines += ["- " + ", ".join(f"{k}: {v if v != '' else chr(34) * 2}" for k, v in settings.items()), ""]
    if columns:
        lines.append("| model | " + " | ".join(f"{_info(c).label} {_info(c).arrow}" for c in columns) + " |")
        lines.append("| --- |" + " ---: |" * len(columns))
        for model in models:
            cells = []
            for c in columns:
                value = values[c].get(model, math.nan)
                cell = _fmt(c, value)
                if c in result.kid_std and model in result.kid_std[c] and math.isfinite(value):
                    cell = mean_std_text(value, result.kid_std[c][model], _info(c).fmt)
                elif c in PER_IMAGE:
                    s = result.table.summary(c, model)
                    cell = mean_std_text(s.mean, s.std, _info(c).fmt) if s.count > 1 else cell
                cells.append(cell)
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", "Per-image metrics: mean ± standard deviation over images; KID: mean ± std over subsets.", ""]
    per_image = [m for m in PER_IMAGE if m in result.table.metrics()]
    if per_image and len(models) > 1:
        lines += ["## Win rates (per prompt, mean over seeds; ties count half)", ""]
        lines.append("| A over B | " + " | ".join(_info(m).label for m in per_image) + " |")
        lines.append("| --- |" + " ---: |" * len(per_image))
        for a, b in win_rate_pairs(models):
            cells = []
            for m in per_image:
                w = result.table.win_rate(m, a, b)
                cells.append("n/a" if not w.prompts else f"{100 * w.rate:.1f}% ({w.wins}/{w.ties}/{w.losses})")
            lines.append(f"| {a} over {b} | " + " | ".join(cells) + " |")
        lines += ["", "(wins/ties/losses over prompts)", ""]
    if result.descriptions:
        lines += ["## How each number was computed", ""]
        lines += [f"- **{_info(m).label}**: {d}" for m, d in result.descriptions.items()]
        small = [m for m in ("fid", "fd_dinov2") if m in result.set_metrics]
        if small:
            lines.append(
                "- Fréchet distances from fewer images than the feature size are biased upwards: "
                "compare only runs with the same number of images."
            )
        lines.append("")
    if result.skipped:
        lines += ["## Skipped", ""]
        lines += [f"- **{_info(m).label}**: {reason}" for m, reason in result.skipped.items()]
        lines.append("")
    return "\n".join(lines)


def report_json(result: EvalResult, models: Sequence[str], model_descriptions: Mapping[str, str], settings: Mapping) -> dict:
    per_image = [m for m in PER_IMAGE if m in result.table.metrics()]
    return {
        "models": {m: model_descriptions.get(m, m) for m in models},
        "settings": dict(settings),
        "table": table_values(result, models),
        "set_metrics": result.set_metrics,
        "kid_std": result.kid_std,
        "summary": {
            m: {x: vars(result.table.summary(m, x)) for x in models} for m in per_image
        },
        "win_rates": [
            {"a": a, "b": b, "metric": m, **vars(result.table.win_rate(m, a, b)), "rate": result.table.win_rate(m, a, b).rate}
            for a, b in win_rate_pairs(models)
            for m in per_image
        ],
        "per_image": result.table.to_json(),
        "descriptions": result.descriptions,
        "skipped": result.skipped,
        "reference": result.reference,
    }


def write_report(
    out_dir: Path, result: EvalResult, models: Sequence[str], model_descriptions: Mapping[str, str], settings: Mapping
) -> list[Path]:
    """report.md, report.json and (when any metric has a value) chart.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    md = out_dir / "report.md"
    atomic_write_bytes(md, markdown(result, models, model_descriptions, settings).encode())
    data = report_json(result, models, model_descriptions, settings)
    js = out_dir / "report.json"
    atomic_write_bytes(js, json.dumps(_finite(data), indent=2, ensure_ascii=False).encode())
    written += [md, js]
    values = table_values(result, models)
    if any(math.isfinite(v) for per in values.values() for v in per.values()):
        labels = {m: f"{_info(m).label} ({'higher' if _info(m).higher_is_better else 'lower'} is better)" for m in values}
        chart = out_dir / "chart.png"
        save_png(bar_chart(values, list(models), labels), chart)
        written.append(chart)
    return written


def _finite(value):
    """JSON has no NaN: missing numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
