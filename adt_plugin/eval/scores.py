"""Per-image scores, their summaries, and win rates.

A `ScoreTable` holds, for each metric and each model (or ComfyUI variant), one
value per image, keyed by (prompt index, seed). Win rate of A over B (per prompt):
average each model's scores over a prompt's seeds, then A wins the prompt if its
average is higher (lower, for lower-is-better metrics); ties count half.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping


@dataclass(frozen=True)
class MetricInfo:
    label: str
    higher_is_better: bool
    fmt: str = "{:.2f}"
    short: str = ""  # for notes drawn on image cells

    @property
    def tag(self) -> str:
        return self.short or self.label

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


METRICS: dict[str, MetricInfo] = {
    "fid": MetricInfo("FID", False),
    "kid": MetricInfo("KID x1e3", False),
    "fd_dinov2": MetricInfo("FD-DINOv2", False, "{:.1f}"),
    "kid_dinov2": MetricInfo("KID-DINOv2 x1e3", False),
    "clip": MetricInfo("CLIP score", True, short="CLIP"),
    "hps": MetricInfo("HPSv2", True, short="HPS"),
    "aesthetic": MetricInfo("Aesthetic", True, "{:.3f}", short="AES"),
    "disc": MetricInfo("ADT D score", True, "{:.3f}", short="D"),
}

Key = tuple[int, int]  # (prompt index, seed)


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float
    count: int


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int

    @property
    def prompts(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        """(wins + ties / 2) / prompts; NaN when no prompt is shared."""
        return (self.wins + 0.5 * self.ties) / self.prompts if self.prompts else math.nan


def mean_std_text(mean: float, std: float, fmt: str = "{:.2f}") -> str:
    """`mean ± std` with enough decimals to show the spread: two significant digits of
    the std when the metric's own format would print it as 0 ("0.1235 ± 0.0012", not
    "0.12 ± 0.00")."""
    match = re.fullmatch(r"\{:\.(\d+)f\}", fmt)
    decimals = int(match[1]) if match else 2
    if std == 0:
        return f"{mean:.{decimals}f} ± 0"  # every value the same
    if math.isfinite(std):
        decimals = max(decimals, min(8, math.ceil(-math.log10(std)) + 1))
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def summarize(values: Iterable[float]) -> Summary:
    values = [float(v) for v in values]
    if not values:
        return Summary(math.nan, math.nan, 0)
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return Summary(mean, math.sqrt(var), len(values))


def per_prompt_means(values: Mapping[Key, float]) -> dict[int, float]:
    groups: dict[int, list[float]] = {}
    for (prompt, _seed), value in values.items():
        groups.setdefault(prompt, []).append(float(value))
    return {p: sum(v) / len(v) for p, v in groups.items()}


def win_rate(a: Mapping[Key, float], b: Mapping[Key, float], higher_is_better: bool = True) -> WinRate:
    """A over B, per prompt, over the prompts both have scores for."""
    pa, pb = per_prompt_means(a), per_prompt_means(b)
    wins = ties = losses = 0
    for prompt in sorted(set(pa) & set(pb)):
        x, y = (pa[prompt], pb[prompt]) if higher_is_better else (pb[prompt], pa[prompt])
        if x > y:
            wins += 1
        elif x == y:
            ties += 1
        else:
            losses += 1
    return WinRate(wins, ties, losses)


@dataclass
class ScoreTable:
    """metric -> model -> {(prompt index, seed): value}"""

    values: dict[str, dict[str, dict[Key, float]]] = field(default_factory=dict)

    def add(self, metric: str, model: str, prompt_index: int, seed: int, value: float) -> None:
        self.values.setdefault(metric, {}).setdefault(model, {})[(int(prompt_index), int(seed))] = float(value)

    def metrics(self) -> list[str]:
        return list(self.values)

    def get(self, metric: str, model: str) -> dict[Key, float]:
        return self.values.get(metric, {}).get(model, {})

    def summary(self, metric: str, model: str) -> Summary:
        return summarize(self.get(metric, model).values())

    def win_rate(self, metric: str, a: str, b: str) -> WinRate:
        info = METRICS.get(metric, MetricInfo(metric, True))
        return win_rate(self.get(metric, a), self.get(metric, b), info.higher_is_better)

    def merged(self, other: "ScoreTable") -> "ScoreTable":
        out = ScoreTable({m: {k: dict(v) for k, v in per.items()} for m, per in self.values.items()})
        for metric, per_model in other.values.items():
            for model, values in per_model.items():
                out.values.setdefault(metric, {}).setdefault(model, {}).update(values)
        return out

    def to_json(self) -> dict:
        return {
            metric: {model: [[p, s, v] for (p, s), v in sorted(values.items())] for model, values in per.items()}
            for metric, per in self.values.items()
        }

    @classmethod
    def from_json(cls, data: Mapping) -> "ScoreTable":
        table = cls()
        for metric, per in data.items():
            for model, rows in per.items():
                for prompt, seed, value in rows:
                    table.add(metric, model, prompt, seed, value)
        return table
