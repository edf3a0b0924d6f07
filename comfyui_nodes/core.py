"""The comparison's logic, free of ComfyUI imports (tested without ComfyUI).

Rows are (prompt, seed) pairs, prompt-major; columns are the variants A, B, C.
Every cell of a row is sampled with that row's seed, so each variant starts from
the same noise. A `Comparison` carries images, labels, settings, provenance and
scores from the comparison node to the metric nodes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from adt_plugin.eval.grid import render_grid
from adt_plugin.eval.images import tensor_to_pil
from adt_plugin.eval.scores import METRICS, ScoreTable

SLOTS = ("A", "B", "C")
BASE_CHOICE = "(base: no LoRA)"
SKIP_CHOICE = "(skip this column)"
DISC_SUFFIX = ".adt_disc.safetensors"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


class PathRefused(ValueError):
    """A file name that does not resolve inside ComfyUI's model folders."""


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are ignored."""
    prompts = [line.strip() for line in str(text).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError("the prompt list is empty: write one prompt per line")
    return prompts


def seeds_from(seed: int, count: int) -> list[int]:
    if count < 1:
        raise ValueError(f"seeds per prompt must be >= 1, got {count}")
    return [(int(seed) + i) % (MAX_SEED + 1) for i in range(count)]


@dataclass(frozen=True)
class Row:
    prompt_index: int
    prompt: str
    seed: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.prompt_index, self.seed)

    @property
    def label(self) -> str:
        return f"seed {self.seed}\n{self.prompt}"  # the seed first: it stays visible when a long prompt is cut


def plan_rows(prompts: Sequence[str], seeds: Sequence[int]) -> list[Row]:
    return [Row(p, prompt, seed) for p, prompt in enumerate(prompts) for seed in seeds]


@dataclass(frozen=True)
class Variant:
    slot: str
    lora: Optional[str]  # a name from ComfyUI's loras list, or None for no LoRA
    strength: float = 1.0
    label: str = ""
    own_model: bool = False  # this column's MODEL / CLIP come from its own inputs, not the base

    @property
    def header(self) -> str:
        model = f"model_{self.slot.lower()}" if self.own_model else "base"
        lora = f"{os.path.basename(self.lora)} @ {self.strength:.2f}" if self.lora else "no LoRA"
        head = f"{self.slot}: {self.label}" if self.label else f"{self.slot}: {model}"
        return f"{head}\n{model} + {lora}" if self.label or self.lora or self.own_model else head


def variants_from(choices: Sequence[tuple[str, str, float, str, bool]]) -> list[Variant]:
    """(slot, lora choice, strength, label, has own model) -> the enabled variants."""
    out = []
    for slot, choice, strength, label, own in choices:
        if choice == SKIP_CHOICE:
            continue
        out.append(Variant(slot, None if choice == BASE_CHOICE else choice, float(strength), label.strip(), bool(own)))
    if not out:
        raise ValueError("every column is set to skip: enable at least one of A, B, C")
    return out


@dataclass(frozen=True)
class Job:
    """One cell: variant `column` on `row`, sampled with the row's seed."""

    row_index: int
    column: int
    seed: int


def plan_jobs(rows: Sequence[Row], variants: Sequence[Variant]) -> list[Job]:
    """Variant-major (each variant's model is patched once), every cell of a row on its seed."""
    return [Job(r, c, row.seed) for c in range(len(variants)) for r, row in enumerate(rows)]


def settings_title(settings: Mapping[str, Any]) -> str:
    return (
        f"{settings['sampler_name']} / {settings['scheduler']}, {settings['steps']} steps, CFG {settings['cfg']:g}, "
        f"{settings['width']}x{settings['height']}" + (f", negative: {settings['negative']}" if settings.get("negative") else "")
    )


@dataclass
class Comparison:
    """What the comparison node hands to the metric nodes (the ADT_COMPARISON type)."""

    variants: list[Variant]
    rows: list[Row]
    images: list[torch.Tensor]  # per variant: [len(rows), H, W, C] in [0, 1] (ComfyUI IMAGE)
    settings: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)
    scores: ScoreTable = field(default_factory=ScoreTable)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.images) != len(self.variants):
            raise ValueError(f"{len(self.variants)} variants but {len(self.images)} image batches")
        for v, batch in zip(self.variants, self.images):
            if batch.shape[0] != len(self.rows):
                raise ValueError(f"variant {v.slot} has {batch.shape[0]} images for {len(self.rows)} rows")

    def with_scores(self, metric: str, values: Sequence[torch.Tensor], description: str = "") -> "Comparison":
        """A copy with per-image `values[variant][row]` of `metric` added."""
        table = ScoreTable()
        for variant, per_row in zip(self.variants, values):
            for row, value in zip(self.rows, per_row):
                table.add(metric, variant.slot, row.prompt_index, row.seed, float(value))
        notes = self.notes + ([f"{_label(metric)}: {description}"] if description else [])
        return dataclasses.replace(self, scores=self.scores.merged(table), notes=notes)

    def with_note(self, note: str) -> "Comparison":
        return dataclasses.replace(self, notes=self.notes + [note])

    def cell_notes(self) -> list[list[list[str]]]:
        metrics = self.scores.metrics()
        out = []
        for row in self.rows:
            out.append([
                [f"{_tag(m)} {_fmt(m, v)}" for m in metrics if (v := self.scores.get(m, variant.slot).get(row.key)) is not None]
                for variant in self.variants
            ])
        return out

    def headers(self) -> list[str]:
        headers = []
        for variant in self.variants:
            means = [f"{_tag(m)} {_fmt(m, self.scores.summary(m, variant.slot).mean)}" for m in self.scores.metrics()]
            headers.append(variant.header + ("\nmean " + " ".join(means) if means else ""))
        return headers

    def grid(self):
        """The labelled grid as a PIL image (scores overlaid when there are any)."""
        cells = [[tensor_to_pil(batch[r]) for batch in self.images] for r in range(len(self.rows))]
        notes = self.cell_notes() if self.scores.metrics() else None
        return render_grid(cells, self.headers(), [row.label for row in self.rows], settings_title(self.settings), notes)

    def table_text(self) -> str:
        """Markdown: per-variant means, win rates against A, then every image's scores."""
        metrics = self.scores.metrics()
        lines = [settings_title(self.settings), ""]
        if not metrics:
            return "\n".join(lines + ["(no scores yet)"] + self.notes)
        lines.append("| variant | " + " | ".join(f"{_label(m)} {METRICS[m].arrow if m in METRICS else ''}" for m in metrics) + " |")
        lines.append("| --- |" + " ---: |" * len(metrics))
        for v in self.variants:
            cells = []
            for m in metrics:
                s = self.scores.summary(m, v.slot)
                cells.append(f"{_fmt(m, s.mean)} ± {s.std:.2f}" if s.count > 1 else _fmt(m, s.mean))
            lines.append(f"| {v.header.splitlines()[0]} | " + " | ".join(cells) + " |")
        first = self.variants[0].slot
        if len(self.variants) > 1:
            lines += ["", f"Win rate over {first} (per prompt, mean over seeds, ties count half):", ""]
            for v in self.variants[1:]:
                parts = []
                for m in metrics:
                    w = self.scores.win_rate(m, v.slot, first)
                    parts.append(f"{_label(m)} {100 * w.rate:.0f}% ({w.wins}/{w.ties}/{w.losses})" if w.prompts else f"{_label(m)} n/a")
                lines.append(f"- {v.slot} over {first}: " + ", ".join(parts))
        lines += ["", "| prompt | seed | variant | " + " | ".join(_label(m) for m in metrics) + " |"]
        lines.append("| --- | ---: | --- |" + " ---: |" * len(metrics))
        for row in self.rows:
            for v in self.variants:
                values = [_fmt(m, self.scores.get(m, v.slot).get(row.key, math.nan)) for m in metrics]
                lines.append(f"| {row.prompt} | {row.seed} | {v.slot} | " + " | ".join(values) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def _label(metric: str) -> str:
    return METRICS[metric].label if metric in METRICS else metric


def _tag(metric: str) -> str:
    return METRICS[metric].tag if metric in METRICS else metric


def _fmt(metric: str, value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return (METRICS[metric].fmt if metric in METRICS else "{:.3f}").format(value)


def empty_image_batch(height: int, width: int) -> torch.Tensor:
    """A valid IMAGE with no images (for a skipped column): Save/Preview nodes write nothing."""
    return torch.zeros((0, height, width, 3))


def pil_to_image(image) -> torch.Tensor:
    """PIL -> ComfyUI IMAGE [1, H, W, 3] float in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).unsqueeze(0)


# ---- files: only inside ComfyUI's model folders ---------------------------------------


class NotInFolders(FileNotFoundError):
    """A safe name that is not (yet) in any of the folders."""


def resolve_inside(folders: Sequence[str], name: str, what: str) -> Path:
    """The path of `name` under one of `folders`. Absolute paths and '..' are refused
    (PathRefused); links placed inside a folder are followed, as ComfyUI does."""
    if not name or os.path.isabs(name) or Path(name).drive or ".." in Path(name.replace("\\", "/")).parts:
        raise PathRefused(f"{what} {name!r} is not a name inside ComfyUI's model folders ({', '.join(folders)})")
    for folder in folders:
        candidate = Path(folder) / name
        if candidate.exists():
            return candidate
    raise NotInFolders(f"{what} {name!r} is not in {', '.join(folders)}")


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached by (path, size, modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


# ---- provenance ---------------------------------------------------------------------------

# widget inputs of loader nodes that name a model file, and the ComfyUI folder they live in
FILE_INPUTS = {
    "ckpt_name": "checkpoints",
    "lora_name": "loras",
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "vae_name": "vae",
}


def trace_sources(prompt: Mapping[str, Any], node_id: str, input_name: str, max_depth: int = 32) -> list[dict[str, Any]]:
    """Walk up an API-format prompt from `node_id`'s `input_name` link through the
    nodes that produced it (following their own input of the same name, e.g. a
    LoraLoader's `model`) and list each node's file inputs, nearest first."""
    chain: list[dict[str, Any]] = []
    link = (prompt.get(str(node_id), {}).get("inputs", {}) or {}).get(input_name)
    seen = set()
    while isinstance(link, (list, tuple)) and len(link) == 2 and len(chain) < max_depth:
        source = str(link[0])
        if source in seen or source not in prompt:
            break
        seen.add(source)
        node = prompt[source]
        inputs = node.get("inputs", {}) or {}
        files = {k: v for k, v in inputs.items() if k in FILE_INPUTS and isinstance(v, str)}
        strengths = {k: v for k, v in inputs.items() if k.startswith("strength") and isinstance(v, (int, float))}
        chain.append({"node": source, "class_type": node.get("class_type"), **files, **strengths})
        link = inputs.get(input_name)
    return chain


def provenance_record(
    variants: Sequence[Variant],
    settings: Mapping[str, Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    model_sources: Mapping[str, Any],
    lora_hashes: Mapping[str, Optional[str]],
    versions: Mapping[str, str],
) -> dict[str, Any]:
    """Everything needed to reproduce the grid: versions, sampler settings, prompts,
    seeds, and per variant where its model came from and which LoRA (with hashes)."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": dict(versions),
        "settings": dict(settings),
        "prompts": list(prompts),
        "seeds": list(seeds),
        "noise": "per cell: ComfyUI's noise for the row's seed (as KSampler with that seed and batch size 1); identical in every column",
        "variants": [
            {
                "slot": v.slot,
                "label": v.label or None,
                "model": model_sources.get(v.slot),
                "lora": None if v.lora is None else {"name": v.lora, "strength": v.strength, "sha256": lora_hashes.get(v.lora)},
            }
            for v in variants
        ],
    }


def provenance_text(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=2, ensure_ascii=False)
