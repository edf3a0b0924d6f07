"""The nodes: an A/B/C comparison sampler and metric nodes that score its images.

ComfyUI modules (folder_paths, comfy.*, nodes) are imported inside functions, so
this file imports without ComfyUI; the logic it calls lives in `core` and in
`adt_plugin.eval`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import torch

from . import core
from .core import BASE_CHOICE, DISC_SUFFIX, SKIP_CHOICE, Comparison, NotInFolders, PathRefused
from .spec import Hidden, In, NodeSpec, Out

log = logging.getLogger("adt_comfyui")
METRICS_FOLDER = "adt_metrics"  # ComfyUI/models/adt_metrics (or extra_model_paths.yaml: adt_metrics)
COMPARISON = "ADT_COMPARISON"


# ---- ComfyUI folders -------------------------------------------------------------------


def register_metrics_folder() -> None:
    import folder_paths

    default = os.path.join(folder_paths.models_dir, METRICS_FOLDER)
    folder_paths.add_model_folder_path(METRICS_FOLDER, default)
    os.makedirs(default, exist_ok=True)


def _folders(kind: str) -> list[str]:
    import folder_paths

    try:
        return folder_paths.get_folder_paths(kind)
    except KeyError:
        return []


def lora_choices() -> list[str]:
    import folder_paths

    names = [n for n in folder_paths.get_filename_list("loras") if not n.endswith(DISC_SUFFIX)]
    return [BASE_CHOICE, SKIP_CHOICE, *names]


def disc_choices() -> list[str]:
    import folder_paths

    names = [n for n in folder_paths.get_filename_list("loras") if n.endswith(DISC_SUFFIX)]
    names += [n for n in _list_metric_entries() if n.endswith(DISC_SUFFIX)]
    return names or [f"(none: put <lora>{DISC_SUFFIX} beside the LoRA in models/loras)"]


def _list_metric_entries() -> list[str]:
    """Top-level files and model folders in every adt_metrics folder."""
    names = set()
    for folder in _folders(METRICS_FOLDER):
        if os.path.isdir(folder):
            names.update(os.listdir(folder))
    return sorted(names)


# Hub ids offered after the files in models/adt_metrics: read from the Hugging Face cache,
# or downloaded into it once when chosen (online). DINOv2 here is the discriminator's
# backbone, so the one ADT trains with.
HUB_CHOICES = {
    "dinov2": ("facebook/dinov2-small",),
    "clip": ("openai/clip-vit-large-patch14",),
    "hps": ("xswu/HPSv2/HPS_v2.1_compressed.pt",),
}


def _metric_choices(key: str) -> list[str]:
    from adt_plugin.eval.weights import WEIGHTS

    spec = WEIGHTS[key]
    entries = _list_metric_entries()
    if spec.folder:  # Hugging Face folders whose config says they are this kind of model
        found = [n for n in entries if any(_model_type(os.path.join(f, n)) == key for f in _folders(METRICS_FOLDER))]
    else:
        found = [n for n in entries if n.endswith((".pt", ".pth", ".safetensors", ".bin")) and not n.endswith(DISC_SUFFIX)]
    preferred = [n for n in spec.names if n in found]
    others = [n for n in found if n not in preferred]
    return preferred + others + list(HUB_CHOICES.get(key, ())) or [missing_choice(key)]


def _model_type(folder: str) -> Optional[str]:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            return json.load(handle).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def missing_choice(key: str) -> str:
    from adt_plugin.eval.weights import WEIGHTS

    spec = WEIGHTS[key]
    return f"(missing: put {spec.names[0]}{'/' if spec.folder else ''} in models/{METRICS_FOLDER})"


def is_hub_name(key: str, name: str) -> bool:
    """'org/name' (a model) or 'org/repo/file' (one file) as the Hub names them."""
    from adt_plugin import hub
    from adt_plugin.eval.weights import WEIGHTS

    if WEIGHTS[key].folder:
        return "/" in name and hub.is_hub_id(name)
    return hub.split_hub_file(name) is not None


def metric_path(key: str, name: str) -> str:
    """The weights' path inside models/adt_metrics, or for a hub id its place in the
    Hugging Face cache (downloaded once when online). Missing: WeightsNotFound saying
    what to put where and how to get it (shown as a note, not a traceback)."""
    from adt_plugin.eval.weights import WEIGHTS, WeightsNotFound, resolve_weights

    spec = WEIGHTS[key]
    hint = f"put {' or '.join(spec.names)} in {', '.join(_folders(METRICS_FOLDER))}. Get it with: {spec.get}"
    if name.startswith("(missing"):
        raise WeightsNotFound(f"{spec.what} not found: {hint}")
    try:
        return str(core.resolve_inside(_folders(METRICS_FOLDER), name, spec.what))
    except NotInFolders as err:
        if is_hub_name(key, name):
            return str(resolve_weights(key, name, echo=log.info))
        raise WeightsNotFound(f"{err}; {hint}") from err


def lora_path(name: str) -> str:
    return str(core.resolve_inside(_folders("loras"), name, "LoRA"))


def disc_path(name: str) -> str:
    if name.startswith("(none"):
        raise FileNotFoundError(f"no *{DISC_SUFFIX} in {', '.join(_folders('loras'))}: ADT training writes it beside the LoRA")
    if not name.endswith(DISC_SUFFIX):
        raise PathRefused(f"{name!r} is not an ADT discriminator file (*{DISC_SUFFIX}); train with ADT to get one beside the LoRA")
    return str(core.resolve_inside(_folders("loras") + _folders(METRICS_FOLDER), name, "discriminator"))


# ---- the comparison --------------------------------------------------------------------


def _sampler_choices() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS)


def _scheduler_choices() -> list[str]:
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)


def validate_compare(cls, lora_a, lora_b, lora_c, sampler_name, scheduler):
    """Runs before anything is queued: every name must be in its list and inside ComfyUI's folders."""
    for slot, choice in zip(core.SLOTS, (lora_a, lora_b, lora_c)):
        if choice in (BASE_CHOICE, SKIP_CHOICE):
            continue
        if choice.endswith(DISC_SUFFIX):
            return f"lora_{slot.lower()}: {choice!r} is an ADT discriminator, not a LoRA"
        try:
            lora_path(choice)
        except (PathRefused, NotInFolders) as err:  # a comparison without its LoRA makes no sense: refuse
            return f"lora_{slot.lower()}: {err}"
    if sampler_name not in _sampler_choices():
        return f"sampler_name: unknown sampler {sampler_name!r}"
    if scheduler not in _scheduler_choices():
        return f"scheduler: unknown scheduler {scheduler!r}"
    if all(c == SKIP_CHOICE for c in (lora_a, lora_b, lora_c)):
        return "every column is set to skip: enable at least one of A, B, C"
    return True


def _encode(clip, text: str):
    if clip is None:
        raise RuntimeError("no CLIP: connect the CLIP output of your checkpoint loader (this checkpoint has no text encoder?)")
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _model_sources(hidden: Hidden, variants, hash_files: bool) -> dict[str, Any]:
    """Per slot: the loader nodes upstream of its MODEL input, with file hashes."""
    import folder_paths

    out: dict[str, Any] = {}
    for v in variants:
        input_name = f"model_{v.slot.lower()}" if v.own_model else "model"
        chain = core.trace_sources(hidden.prompt or {}, hidden.unique_id or "", input_name)
        for entry in chain:
            for key, folder in core.FILE_INPUTS.items():
                if key in entry and hash_files:
                    path = folder_paths.get_full_path(folder, entry[key])
                    entry[f"{key}_sha256"] = core.file_sha256(path) if path else None
        out[v.slot] = {"input": input_name, "loaded_by": chain}
    return out


def _versions() -> dict[str, str]:
    import adt_plugin

    versions = {"adt_plugin": adt_plugin.__version__, "torch": torch.__version__}
    try:
        import comfyui_version

        versions["comfyui"] = comfyui_version.__version__
    except Exception:  # noqa: BLE001 - provenance without the version beats no provenance
        pass
    return versions


def run_compare(hidden: Hidden, model, clip, vae, prompts: str, negative: str, seed: int, seeds_per_prompt: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, width: int, height: int,
                lora_a: str, strength_a: float, label_a: str, lora_b: str, strength_b: float, label_b: str,
                lora_c: str, strength_c: float, label_c: str, hash_files: bool = True,
                model_b=None, clip_b=None, model_c=None, clip_c=None):
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import nodes

    prompt_list = core.parse_prompts(prompts)
    seeds = core.seeds_from(seed, seeds_per_prompt)
    rows = core.plan_rows(prompt_list, seeds)
    own = {"A": None, "B": (model_b, clip_b), "C": (model_c, clip_c)}
    variants = core.variants_from([
        ("A", lora_a, strength_a, label_a, False),
        ("B", lora_b, strength_b, label_b, model_b is not None),
        ("C", lora_c, strength_c, label_c, model_c is not None),
    ])
    settings = {"sampler_name": sampler_name, "scheduler": scheduler, "steps": steps, "cfg": cfg,
                "width": width, "height": height, "negative": negative}
    jobs = core.plan_jobs(rows, variants)
    bar = comfy.utils.ProgressBar(len(jobs))
    images: list[list[Optional[torch.Tensor]]] = [[None] * len(rows) for _ in variants]
    lora_hashes: dict[str, Optional[str]] = {}
    for column, variant in enumerate(variants):
        v_model, v_clip = model, clip
        if variant.own_model:
            v_model, v_clip = own[variant.slot][0], own[variant.slot][1] or clip
        if variant.lora is not None:
            path = lora_path(variant.lora)
            lora = comfy.utils.load_torch_file(path, safe_load=True)
            v_model, v_clip = comfy.sd.load_lora_for_models(v_model, v_clip, lora, variant.strength, variant.strength)
            lora_hashes[variant.lora] = core.file_sha256(path) if hash_files else None
        positive = {p: _encode(v_clip, text) for p, text in enumerate(prompt_list)}
        negative_cond = _encode(v_clip, negative)
        for job in (j for j in jobs if j.column == column):
            mm.throw_exception_if_processing_interrupted()
            row = rows[job.row_index]
            latent = {"samples": torch.zeros([1, 4, height // 8, width // 8], device=mm.intermediate_device())}
            (out,) = nodes.common_ksampler(v_model, job.seed, steps, cfg, sampler_name, scheduler,
                                           positive[row.prompt_index], negative_cond, latent)
            decoded = vae.decode(out["samples"])
            if decoded.ndim == 5:
                decoded = decoded.reshape(-1, *decoded.shape[-3:])
            images[column][job.row_index] = decoded[:1].float().cpu()
            bar.update(1)
    batches = [torch.cat(per_row) for per_row in images]
    record = core.provenance_record(variants, settings, prompt_list, seeds, _model_sources(hidden, variants, hash_files),
                                    lora_hashes, _versions())
    comparison = Comparison(variants, rows, batches, settings, record)
    h, w = batches[0].shape[1:3]
    by_slot = {v.slot: b for v, b in zip(variants, batches)}
    separate = [by_slot.get(slot, core.empty_image_batch(h, w)) for slot in core.SLOTS]
    return (core.pil_to_image(comparison.grid()), *separate, comparison, core.provenance_text(record))


def _seed_input() -> In:
    return In("seed", "INT", 0, "first seed; row seeds are seed, seed+1, ... (the same noise in every column)",
              min=0, max=core.MAX_SEED, control_after_generate=True)


def _slot_inputs(slot: str, default: str) -> list[In]:
    s = slot.lower()
    return [
        In(f"lora_{s}", "COMBO", default, f"column {slot}: a LoRA from models/loras, the base model alone, or skip", options=lora_choices),
        In(f"strength_{s}", "FLOAT", 1.0, "LoRA strength (model and CLIP)", min=-10.0, max=10.0, step=0.05),
        In(f"label_{s}", "STRING", "", "column title (default: the LoRA name)"),
    ]


COMPARE = NodeSpec(
    node_id="ADTCompareABC",
    display_name="ADT A/B/C Compare",
    description=(
        "Samples every prompt x seed with up to three variants (base, base + FT LoRA, base + ADT LoRA, or own "
        "MODEL/CLIP inputs) using identical noise per seed, and returns a labelled grid, each column's images, "
        "the comparison for the metric nodes and a provenance record (settings, file hashes)."
    ),
    inputs=[
        In("model", "MODEL", tooltip="the base model (column A, and B / C unless they get their own)"),
        In("clip", "CLIP"),
        In("vae", "VAE"),
        In("prompts", "STRING", "a photograph of an astronaut riding a horse\na red bicycle leaning against a brick wall",
           "one prompt per line (# starts a comment)", multiline=True),
        In("negative", "STRING", "", "negative prompt for every cell", multiline=True),
        _seed_input(),
        In("seeds_per_prompt", "INT", 2, "rows per prompt", min=1, max=64),
        In("steps", "INT", 20, min=1, max=1000),
        In("cfg", "FLOAT", 7.0, min=0.0, max=100.0, step=0.1),
        In("sampler_name", "COMBO", "euler", options=_sampler_choices),
        In("scheduler", "COMBO", "normal", options=_scheduler_choices),
        In("width", "INT", 512, min=64, max=8192, step=8),
        In("height", "INT", 512, min=64, max=8192, step=8),
        *_slot_inputs("A", BASE_CHOICE),
        *_slot_inputs("B", SKIP_CHOICE),
        *_slot_inputs("C", SKIP_CHOICE),
        In("hash_files", "BOOLEAN", True, "sha256 of every checkpoint and LoRA in the provenance (cached per file)"),
        In("model_b", "MODEL", tooltip="column B's own model (e.g. a full fine-tune) instead of the base", optional=True),
        In("clip_b", "CLIP", optional=True),
        In("model_c", "MODEL", tooltip="column C's own model instead of the base", optional=True),
        In("clip_c", "CLIP", optional=True),
    ],
    outputs=[
        Out("grid", "IMAGE", "rows = prompt x seed, columns = variants, with headers"),
        Out("images_a", "IMAGE"),
        Out("images_b", "IMAGE", "empty when column B is skipped"),
        Out("images_c", "IMAGE", "empty when column C is skipped"),
        Out("comparison", COMPARISON, "connect to the ADT metric nodes"),
        Out("provenance", "STRING", "JSON: versions, settings, prompts, seeds, model and LoRA files with sha256"),
    ],
    run=run_compare,
    validate=validate_compare,
)


# ---- metric nodes ----------------------------------------------------------------------

_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, load):
    """Keep the last loaded network of each kind (reloading CLIP-L per run is slow)."""
    kind = key[0]
    for old in [k for k in _CACHE if k[0] == kind and k != key]:
        del _CACHE[old]
    if key not in _CACHE:
        _CACHE[key] = load()
    return _CACHE[key]


def _device():
    import comfy.model_management as mm

    return mm.get_torch_device()


def _comparison_outputs(comparison: Comparison):
    return (comparison, core.pil_to_image(comparison.grid()), comparison.table_text())


def _skipped(comparison: Comparison, metric: str, err: Exception):
    """Missing weights or packages: say so in the table and keep going, no traceback."""
    log.warning("ADT %s skipped: %s", metric, err)
    return _comparison_outputs(comparison.with_note(f"{metric} skipped: {err}"))


def _per_variant(comparison: Comparison, score_batch) -> list[torch.Tensor]:
    return [score_batch(batch.permute(0, 3, 1, 2)) for batch in comparison.images]


def _load_clip(name: str):
    from adt_plugin.eval.clip import load_clip

    path = metric_path("clip", name)
    return _cached(("clip", path), lambda: load_clip(path))


def run_clip_score(hidden: Hidden, comparison: Comparison, clip_model: str):
    try:
        clip = _load_clip(clip_model)
    except (PathRefused, FileNotFoundError) as err:
        return _skipped(comparison, "CLIP score", err)
    clip.model.to(_device())
    prompts = [row.prompt for row in comparison.rows]
    values = _per_variant(comparison, lambda images: clip.clip_scores(clip.image_embeddings(images), prompts))
    clip.model.to("cpu")
    return _comparison_outputs(comparison.with_scores("clip", values, clip.description))


def run_aesthetic(hidden: Hidden, comparison: Comparison, clip_model: str, aesthetic_head: str):
    from adt_plugin.eval.aesthetic import load_aesthetic_head

    try:
        clip = _load_clip(clip_model)
        path = metric_path("aesthetic", aesthetic_head)
        head = _cached(("aesthetic", path), lambda: load_aesthetic_head(path))
    except (PathRefused, FileNotFoundError) as err:
        return _skipped(comparison, "aesthetic score", err)
    clip.model.to(_device())
    values = _per_variant(comparison, lambda images: head(clip.image_embeddings(images)))
    clip.model.to("cpu")
    return _comparison_outputs(comparison.with_scores("aesthetic", values, "LAION aesthetic v2 on " + clip.description))


def run_hps(hidden: Hidden, comparison: Comparison, hps_weights: str):
    from adt_plugin.eval.hps import HpsUnavailable, load_hps

    try:
        path = metric_path("hps", hps_weights)
        scorer = _cached(("hps", path), lambda: load_hps(path))
    except (PathRefused, FileNotFoundError, HpsUnavailable) as err:
        return _skipped(comparison, "HPSv2", err)
    scorer.model.to(_device())
    prompts = [row.prompt for row in comparison.rows]
    values = _per_variant(comparison, lambda images: scorer.scores(list(images), prompts))
    scorer.model.to("cpu")
    return _comparison_outputs(comparison.with_scores("hps", values, scorer.description))


def run_disc_score(hidden: Hidden, comparison: Comparison, discriminator: str, dinov2: str, reference_images=None):
    from adt_plugin.checkpoint import CheckpointMismatch
    from adt_plugin.eval.disc_score import load_discriminator_scorer

    try:
        path = disc_path(discriminator)
        backbone_path = metric_path("dinov2", dinov2)
        scorer = _cached(("disc", path, backbone_path), lambda: load_discriminator_scorer(path, backbone_path=backbone_path))
    except (PathRefused, CheckpointMismatch, FileNotFoundError) as err:
        return _skipped(comparison, "ADT discriminator score", err)
    scorer.disc.to(_device())
    refs = None if reference_images is None else list(reference_images.permute(0, 3, 1, 2))
    values = _per_variant(comparison, lambda images: scorer.scores(images, references=refs))
    scorer.disc.to("cpu")
    mode = "self-reference" if refs is None else f"against {len(refs)} reference images"
    return _comparison_outputs(comparison.with_scores("disc", values, f"{scorer.description}; {mode}"))


def _check_metric(argument: str, key: str, name: str):
    """True, or why the name is refused: only names that point outside the model
    folders. A missing file, a hub id (or the "(missing ...)" placeholder) passes, and the
    run adds a note saying what to download, so the comparison itself still runs."""
    if name.startswith("(missing"):
        return True
    try:  # never a download here: only whether the name stays inside the folders
        core.resolve_inside(_folders(METRICS_FOLDER), name, argument)
    except PathRefused as err:
        return f"{argument}: {err}"
    except FileNotFoundError:
        pass
    return True


def validate_clip_score(cls, clip_model):
    return _check_metric("clip_model", "clip", clip_model)


def validate_aesthetic(cls, clip_model, aesthetic_head):
    first = _check_metric("clip_model", "clip", clip_model)
    return first if first is not True else _check_metric("aesthetic_head", "aesthetic", aesthetic_head)


def validate_hps(cls, hps_weights):
    return _check_metric("hps_weights", "hps", hps_weights)


def validate_disc(cls, discriminator, dinov2):
    try:
        disc_path(discriminator)
    except PathRefused as err:
        return f"discriminator: {err}"
    except FileNotFoundError:
        pass  # reported as a note when the node runs
    return _check_metric("dinov2", "dinov2", dinov2)


_METRIC_OUTPUTS = [
    Out("comparison", COMPARISON, "the comparison with these scores added (chain further metric nodes)"),
    Out("grid", "IMAGE", "the grid with every score so far drawn on each cell and the means in the headers"),
    Out("table", "STRING", "Markdown: means, win rates against column A, every image's scores"),
]
_COMPARISON_IN = In("comparison", COMPARISON, tooltip="from ADT A/B/C Compare or another ADT metric node")

CLIP_SCORE = NodeSpec(
    "ADTClipScore", "ADT CLIP Score",
    "CLIP score (100 x cosine of image and prompt embeddings) of every image, with transformers' CLIP from models/adt_metrics.",
    [_COMPARISON_IN, In("clip_model", "COMBO", "clip-vit-large-patch14",
                        "a transformers CLIP folder in models/adt_metrics, or the hub id (downloaded once into the Hugging Face cache)",
                        options=lambda: _metric_choices("clip"))],
    _METRIC_OUTPUTS, run_clip_score, validate_clip_score,
)
AESTHETIC = NodeSpec(
    "ADTAestheticScore", "ADT Aesthetic Score",
    "LAION aesthetic predictor v2 (1-10) on CLIP ViT-L/14 embeddings; both from models/adt_metrics.",
    [_COMPARISON_IN,
     In("clip_model", "COMBO", "clip-vit-large-patch14", options=lambda: _metric_choices("clip")),
     In("aesthetic_head", "COMBO", "sac+logos+ava1-l14-linearMSE.pth", options=lambda: _metric_choices("aesthetic"))],
    _METRIC_OUTPUTS, run_aesthetic, validate_aesthetic,
)
HPS = NodeSpec(
    "ADTHPSv2Score", "ADT HPSv2 Score",
    "Human Preference Score v2 (needs open_clip_torch); weights from models/adt_metrics.",
    [_COMPARISON_IN, In("hps_weights", "COMBO", "HPS_v2.1_compressed.pt", options=lambda: _metric_choices("hps"))],
    _METRIC_OUTPUTS, run_hps, validate_hps,
)
DISC_SCORE = NodeSpec(
    "ADTDiscriminatorScore", "ADT Discriminator Score",
    "The ADT discriminator's own score of every image (its .adt_disc.safetensors beside the LoRA, on the DINOv2 "
    "it was trained with). Without reference images each image is its own reference (how it scores real images).",
    [_COMPARISON_IN,
     In("discriminator", "COMBO", None, f"a *{DISC_SUFFIX} file from models/loras", options=disc_choices),
     In("dinov2", "COMBO", "dinov2-small",
        "the DINOv2 it was trained with: a folder in models/adt_metrics, or the hub id (downloaded once into the Hugging Face cache)",
        options=lambda: _metric_choices("dinov2")),
     In("reference_images", "IMAGE", tooltip="real images to score against (optional)", optional=True)],
    _METRIC_OUTPUTS, run_disc_score, validate_disc,
)

NODE_SPECS = [COMPARE, CLIP_SCORE, AESTHETIC, HPS, DISC_SCORE]
