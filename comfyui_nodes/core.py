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
from adt_plugin.eval.scores import METRICS, MetricInfo, ScoreTable, mean_std_text

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


# ---- what the comparison node is asked to do: three small records ------------------------


@dataclass(frozen=True)
class PromptSet:
    """The prompts and the seeds every prompt is sampled with."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]

    @classmethod
    def parse(cls, text: str, seed: int, seeds_per_prompt: int) -> "PromptSet":
        return cls(tuple(parse_prompts(text)), tuple(seeds_from(seed, seeds_per_prompt)))

    def rows(self) -> list["Row"]:
        return plan_rows(self.prompts, self.seeds)


@dataclass(frozen=True)
class Sampling:
    """The KSampler settings every cell is sampled with."""

    sampler_name: str
    scheduler: str
    steps: int
    cfg: float
    width: int
    height: int
    negative: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Guidance:
    """How a cell applies the node's `cfg`, as ComfyUI's own workflows do for the model's
    family (adt_plugin/families: its guidance mode):

    cfg        KSampler cfg = the value, against the negative prompt (SD1.x, SDXL, SD3)
    embedded   FluxGuidance: the value goes into the positive conditioning ("guidance"),
               KSampler cfg 1 (FLUX.1-dev: guidance-distilled, one pass per step)
    none       KSampler cfg 1 (FLUX.1-schnell, Z-Image-Turbo: distilled without guidance);
               a cfg that would guide is refused (it would double the cost and leave the
               distribution the model was distilled for)
    """

    ksampler_cfg: float
    conditioning: Optional[float] = None  # the FluxGuidance value, or None
    note: str = ""

    @classmethod
    def for_family(cls, family: Any, cfg: float) -> "Guidance":
        if family is None:  # a model ADT has no family for: KSampler's cfg, as given
            return cls(cfg)
        mode = family.guidance.mode
        if mode == "embedded":
            return cls(1.0, cfg, f"{family.label}: cfg {cfg:g} applied as FluxGuidance (guidance {cfg:g}), KSampler cfg 1")
        if mode == "none":
            if cfg > 1.0:
                raise ValueError(
                    f"{family.label} is guidance-distilled: it samples without guidance (KSampler cfg 1); "
                    f"cfg = {cfg:g} would run a second, unconditional pass it was not made for: set cfg to 1"
                )
            return cls(1.0, None, f"{family.label}: no guidance (KSampler cfg 1)")
        return cls(cfg)


@dataclass(frozen=True)
class ColumnChoice:
    """One column as the node's inputs give it: a LoRA choice, strength, label, and
    optionally the column's own MODEL / CLIP."""

    slot: str
    lora: str  # a LoRA name, BASE_CHOICE or SKIP_CHOICE
    strength: float = 1.0
    label: str = ""
    model: Any = None
    clip: Any = None

    @property
    def skipped(self) -> bool:
        return self.lora == SKIP_CHOICE


def columns_from_inputs(inputs: Mapping[str, Any]) -> list[ColumnChoice]:
    """The three columns from the node's flat inputs (lora_a, strength_a, label_a, model_b, ...)."""
    out = []
    for slot in SLOTS:
        s = slot.lower()
        out.append(ColumnChoice(slot, inputs[f"lora_{s}"], float(inputs[f"strength_{s}"]), str(inputs[f"label_{s}"]),
                                inputs.get(f"model_{s}"), inputs.get(f"clip_{s}")))
    return out


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
    warning: str = ""  # shown under the header, e.g. keys of the LoRA that ComfyUI did not load

    @property
    def header(self) -> str:
        model = f"model_{self.slot.lower()}" if self.own_model else "base"
        lora = f"{os.path.basename(self.lora)} @ {self.strength:.2f}" if self.lora else "no LoRA"
        head = f"{self.slot}: {self.label}" if self.label else f"{self.slot}: {model}"
        head = f"{head}\n{model} + {lora}" if self.label or self.lora or self.own_model else head
        return f"{head}\n({self.warning})" if self.warning else head


def variants_from(columns: Sequence[ColumnChoice]) -> list[Variant]:
    """The enabled columns as variants."""
    out = [
        Variant(c.slot, None if c.lora == BASE_CHOICE else c.lora, float(c.strength), c.label.strip(), c.model is not None)
        for c in columns
        if not c.skipped
    ]
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

    def win_rate_pairs(self) -> list[tuple[str, str]]:
        """Every later column over every earlier one: B over A, C over A, C over B (ADT over FT)."""
        slots = [v.slot for v in self.variants]
        return [(slots[j], slots[i]) for j in range(len(slots)) for i in range(j)]

    def table_text(self) -> str:
        """Markdown: per-variant means ± std, win rates of every later column over every
        earlier one, then every image's scores."""
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
                cells.append(mean_std_text(s.mean, s.std, _info(m).fmt) if s.count > 1 else _fmt(m, s.mean))
            lines.append(f"| {v.header.splitlines()[0]} | " + " | ".join(cells) + " |")
        if len(self.variants) > 1:
            lines += ["", "Win rates (per prompt, mean over seeds; ties count half):", ""]
            for later, earlier in self.win_rate_pairs():
                parts = []
                for m in metrics:
                    w = self.scores.win_rate(m, later, earlier)
                    counted = f"{w.wins} won, {w.ties} tied, {w.losses} lost of {w.prompts} prompts"
                    parts.append(f"{_label(m)} {100 * w.rate:.0f}% ({counted})" if w.prompts else f"{_label(m)} n/a")
                lines.append(f"- {later} over {earlier}: " + ", ".join(parts))
        lines += ["", "| prompt | seed | variant | " + " | ".join(_label(m) for m in metrics) + " |"]
        lines.append("| --- | ---: | --- |" + " ---: |" * len(metrics))
        for row in self.rows:
            for v in self.variants:
                values = [_fmt(m, self.scores.get(m, v.slot).get(row.key, math.nan)) for m in metrics]
                lines.append(f"| {row.prompt} | {row.seed} | {v.slot} | " + " | ".join(values) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def _info(metric: str) -> MetricInfo:
    return METRICS.get(metric, MetricInfo(metric, True, "{:.3f}"))


def _label(metric: str) -> str:
    return _info(metric).label


def _tag(metric: str) -> str:
    return _info(metric).tag


def _fmt(metric: str, value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return _info(metric).fmt.format(value)


def skipped_column_image(slot: str, height: int, width: int) -> torch.Tensor:
    """What a skipped column's IMAGE output holds: one grey image saying so. (An empty
    batch is not valid for ComfyUI's Save / Preview Image: they read images[0].)"""
    from PIL import Image, ImageDraw

    from adt_plugin.eval.grid import load_font, wrap

    image = Image.new("RGB", (width, height), (128, 128, 128))
    size = max(8, min(22, width // 12))
    font = load_font(size)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(wrap(f"column {slot} skipped", font, width - 4, max_lines=3)):
        draw.text((2, 2 + i * int(size * 1.3)), line, fill=(255, 255, 255), font=font)
    return pil_to_image(image)


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


def file_stamp(path: str | os.PathLike) -> list:
    """What changes when a file (or a model folder's files) is rewritten: path, size and
    modification time of each. Nodes return it from IS_CHANGED / fingerprint_inputs, so
    ComfyUI runs them again after a LoRA or discriminator was retrained under its name."""
    path = Path(path)
    if path.is_dir():
        return [str(path), [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()]]
    if path.is_file():
        stat = path.stat()
        return [str(path), stat.st_size, stat.st_mtime_ns]
    return [str(path), None]


# ---- how a LoRA fitted the model (ComfyUI's own key maps decide) -------------------------

BUNDLED_EMBEDDINGS = "bundle_emb."  # textual inversions kohya can bundle in a LoRA; ComfyUI does not load them
LORA_ADVICE = (
    "use it with the checkpoint it was trained for (to apply it anyway, load it with a LoraLoader before this "
    "node's model input and choose (base: no LoRA))"
)


class LoraDoesNotFit(ValueError):
    """A LoRA with keys ComfyUI does not load into this model, or updates of the wrong shape."""


@dataclass(frozen=True)
class LoraFit:
    name: str
    path: str
    keys: int  # tensors in the file
    not_loaded: tuple[str, ...] = ()  # keys ComfyUI logged as "lora key not loaded"
    wrong_shape: tuple[str, ...] = ()  # model weights the LoRA's update does not fit

    @property
    def missing(self) -> list[str]:
        """Keys of LoRA layers that did not load (bundled embeddings are not layers)."""
        return [k for k in self.not_loaded if not k.startswith(BUNDLED_EMBEDDINGS)]

    def problem(self) -> Optional[str]:
        """Why this LoRA must not be compared (the column would be the base model, all or in part)."""
        what = f"LoRA {self.name!r} ({self.path})"
        if self.missing:
            return (f"{what} does not fit this model: ComfyUI loaded {self.keys - len(self.not_loaded)} of its {self.keys} "
                    f"keys (not loaded: {', '.join(self.missing[:3])}{', ...' if len(self.missing) > 3 else ''}); {LORA_ADVICE}")
        if self.wrong_shape:
            return (f"{what} does not fit this model: its update has another shape than {len(self.wrong_shape)} of the "
                    f"weights it names ({', '.join(self.wrong_shape[:3])}{', ...' if len(self.wrong_shape) > 3 else ''}); {LORA_ADVICE}")
        return None

    @property
    def warning(self) -> str:
        """What the column header says about keys left out that do not change the model."""
        extra = len(self.not_loaded) - len(self.missing)
        return f"{extra} bundled embedding keys not loaded" if extra else ""

    def record(self) -> dict[str, Any]:
        return {"keys": self.keys, "keys_loaded": self.keys - len(self.not_loaded), "not_loaded": list(self.not_loaded[:20])}


def update_fits(patch: Any, shape: Sequence[int]) -> Optional[bool]:
    """Whether one ComfyUI weight patch can be added to a weight of `shape`: a LoRA
    (comfy.weight_adapter LoRAAdapter, `weights` = (up, down, alpha, mid, dora, reshape):
    up @ down reshaped to the weight) or a ("diff", (tensor,)) patch. None: a kind this
    check does not know (LoHa, LoKr, ...), left to ComfyUI."""
    if type(patch).__name__ == "LoRAAdapter":
        up, down, _alpha, mid, _dora, reshape = patch.weights[:6]
        if mid is not None or reshape is not None:
            return None
        out, numel = shape[0] if shape else 1, math.prod(shape)
        return up.shape[1] == down.shape[0] and up.shape[0] == out and up.shape[0] * down[0].numel() == numel
    if isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff":
        return tuple(patch[1][0].shape) == tuple(shape)
    return None


def wrong_shapes(before: Mapping[str, list], after: Mapping[str, list], weights: Mapping[str, torch.Tensor]) -> list[str]:
    """The weights whose newly added patches do not fit them. `before` / `after` are a
    ModelPatcher's `patches` ({key: [(strength, patch, strength_model, offset, function)]})
    before and after the LoRA was added. ComfyUI itself notices only while sampling, logs
    an error and leaves the weight unchanged, so the column would silently be the base."""
    bad = []
    for key, patches in after.items():
        weight = weights.get(key)
        if weight is None:
            continue
        for entry in patches[len(before.get(key, [])):]:
            patch, offset = entry[1], entry[3]
            shape = list(weight.shape)
            if offset:  # (dim, start, length): a slice of a fused weight (SD3's qkv)
                shape[offset[0]] = offset[2]
            if update_fits(patch, shape) is False:
                bad.append(key)
                break
    return bad


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
    lora_fits: Optional[Mapping[str, LoraFit]] = None,
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
                "lora": None if v.lora is None else {
                    "name": v.lora, "strength": v.strength, "sha256": lora_hashes.get(v.lora),
                    **((lora_fits or {})[v.slot].record() if v.slot in (lora_fits or {}) else {}),
                },
            }
            for v in variants
        ],
    }


def provenance_text(record: Mapping[str, Any]) -> str:
    return json.dumps(record, indent=2, ensure_ascii=False)
