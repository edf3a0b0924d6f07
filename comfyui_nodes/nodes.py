"""The nodes: an A/B/C comparison sampler and metric nodes that score its images.

ComfyUI modules (folder_paths, comfy.*, nodes) are imported inside functions, so
this file imports without ComfyUI; the logic it calls lives in `core` and in
`adt_plugin.eval`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Optional, Sequence

import torch

from . import core
from .core import BASE_CHOICE, DISC_SUFFIX, SKIP_CHOICE, ColumnChoice, Comparison, NotInFolders, PathRefused, PromptSet, Sampling
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


def _metric_choices(key: str, missing: Optional[str] = None) -> list[str]:
    from adt_plugin.eval.weights import WEIGHTS

    spec = WEIGHTS[key]
    entries = _list_metric_entries()
    if spec.folder:  # Hugging Face folders whose config says they are this kind of model
        found = [n for n in entries if any(_model_type(os.path.join(f, n)) == key for f in _folders(METRICS_FOLDER))]
    else:
        found = [n for n in entries if n.endswith((".pt", ".pth", ".safetensors", ".bin")) and not n.endswith(DISC_SUFFIX)]
    preferred = [n for n in spec.names if n in found]
    others = [n for n in found if n not in preferred]
    return preferred + others + list(HUB_CHOICES.get(key, ())) or [missing or missing_choice(key)]


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
            path = lora_path(choice)
        except (PathRefused, NotInFolders) as err:  # a comparison without its LoRA makes no sense: refuse
            return f"lora_{slot.lower()}: {err}"
        unreadable = _unreadable_safetensors(path, f"LoRA {choice!r}")
        if unreadable:
            return f"lora_{slot.lower()}: {unreadable}"
    if sampler_name not in _sampler_choices():
        return f"sampler_name: unknown sampler {sampler_name!r}"
    if scheduler not in _scheduler_choices():
        return f"scheduler: unknown scheduler {scheduler!r}"
    if all(c == SKIP_CHOICE for c in (lora_a, lora_b, lora_c)):
        return "every column is set to skip: enable at least one of A, B, C"
    return True


def _unreadable_safetensors(path: str, what: str) -> Optional[str]:
    """Why a .safetensors file's header cannot be read (a cut-off download), or None."""
    if not path.lower().endswith(".safetensors"):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        return f"{what} ({path}) cannot be read ({_first_line(err)}): it is not a complete .safetensors file; save or download it again"
    return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def fingerprint_compare(cls, **inputs):
    """Changes when a chosen LoRA file is rewritten (retrained under the same name), so
    ComfyUI samples again instead of serving the cached grid with the old sha256."""
    stamps = []
    for slot in core.SLOTS:
        choice = inputs.get(f"lora_{slot.lower()}")
        if not isinstance(choice, str) or choice in (BASE_CHOICE, SKIP_CHOICE):
            continue
        try:
            stamps.append(core.file_stamp(lora_path(choice)))
        except (PathRefused, NotInFolders):
            stamps.append([choice, None])
    return json.dumps(stamps)


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


NOT_LOADED = "lora key not loaded: "  # comfy/lora.py load_lora's warning for a key it has no place for
NOT_PATCHED = "NOT LOADED "  # comfy/sd.py load_lora_for_models': a mapped weight the model does not have


@contextmanager
def _comfy_warnings():
    """The warnings ComfyUI logs inside the block (load_lora reports unused keys only so)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    root, handler = logging.getLogger(), Collect(logging.WARNING)
    level = root.level
    root.addHandler(handler)
    if level > logging.WARNING:  # a quieter console must not hide them from us
        root.setLevel(logging.WARNING)
    try:
        yield messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def read_lora(path: str, name: str) -> dict:
    import comfy.utils

    try:
        return comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as err:  # noqa: BLE001 - name the file whatever went wrong
        raise ValueError(f"LoRA {name!r} ({path}) cannot be read ({_first_line(err)}): save or download it again") from err


def apply_lora(model, clip, variant: core.Variant):
    """ComfyUI's own LoRA loading (comfy.sd.load_lora_for_models) plus the check it
    lacks: every key of the file must load and fit, or the column would silently be
    (partly) the base model. Returns (model, clip, LoraFit)."""
    import comfy.sd

    path = lora_path(variant.lora)
    lora = read_lora(path, variant.lora)
    with _comfy_warnings() as messages:
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, variant.strength, variant.strength)
    not_loaded = [m[len(NOT_LOADED):] for m in messages if m.startswith(NOT_LOADED)]
    not_loaded += [f"{m[len(NOT_PATCHED):]} (no such weight)" for m in messages if m.startswith(NOT_PATCHED)]
    wrong = []
    for old, new in ((model, new_model), (getattr(clip, "patcher", None), getattr(new_clip, "patcher", None))):
        if old is not None and new is not None:
            wrong += core.wrong_shapes(old.patches, new.patches, new.model.state_dict())
    fit = core.LoraFit(variant.lora, path, len(lora), tuple(not_loaded), tuple(wrong))
    problem = fit.problem()
    if problem:
        raise core.LoraDoesNotFit(f"column {variant.slot}: {problem}")
    return new_model, new_clip, fit


def model_family(model) -> Optional[Any]:
    """The ADT model family of a ComfyUI MODEL, from its weights' names (nothing is
    copied), or None for a model ADT has no family for."""
    from adt_plugin.families import FamilyError, family_for

    try:
        return family_for(model.model.state_dict())
    except (FamilyError, AttributeError):
        return None


def sample_column(model, clip, vae, rows: Sequence[core.Row], prompts: Sequence[str], sampling: Sampling, bar) -> torch.Tensor:
    """Every row of one column, each cell like a KSampler with the row's seed: [rows, H, W, 3].
    The cfg is applied as ComfyUI's workflows do for the model's family (core.Guidance:
    FLUX.1-dev's through FluxGuidance with KSampler cfg 1)."""
    import comfy.model_management as mm
    import nodes

    guidance = core.Guidance.for_family(model_family(model), sampling.cfg)
    positive = {p: _encode(clip, text) for p, text in enumerate(prompts)}
    if guidance.conditioning is not None:
        import node_helpers

        positive = {p: node_helpers.conditioning_set_values(c, {"guidance": guidance.conditioning}) for p, c in positive.items()}
    negative = _encode(clip, sampling.negative)
    images = []
    for row in rows:
        mm.throw_exception_if_processing_interrupted()
        # 4 channels: ComfyUI widens an empty latent to the model's own (16 for SD3 / FLUX)
        latent = {"samples": torch.zeros([1, 4, sampling.height // 8, sampling.width // 8], device=mm.intermediate_device())}
        (out,) = nodes.common_ksampler(model, row.seed, sampling.steps, guidance.ksampler_cfg, sampling.sampler_name,
                                       sampling.scheduler, positive[row.prompt_index], negative, latent)
        decoded = vae.decode(out["samples"])
        if decoded.ndim == 5:
            decoded = decoded.reshape(-1, *decoded.shape[-3:])
        images.append(decoded[:1].float().cpu())
        bar.update(1)
    return torch.cat(images)


def run_compare(hidden: Hidden, model, clip, vae, prompts: PromptSet, sampling: Sampling,
                columns: Sequence[ColumnChoice], hash_files: bool = True):
    """Patch every column's model first (a LoRA that does not fit stops the run before
    any sampling), then sample column by column with each row's seed."""
    import comfy.utils

    rows = prompts.rows()
    variants = core.variants_from(columns)
    by_slot = {c.slot: c for c in columns}
    patched, fits, lora_hashes = {}, {}, {}
    for variant in variants:
        column = by_slot[variant.slot]
        v_model, v_clip = (column.model, column.clip or clip) if variant.own_model else (model, clip)
        if variant.lora is not None:
            v_model, v_clip, fits[variant.slot] = apply_lora(v_model, v_clip, variant)
            lora_hashes[variant.lora] = core.file_sha256(fits[variant.slot].path) if hash_files else None
        patched[variant.slot] = (v_model, v_clip)
    variants = [dataclasses.replace(v, warning=fits[v.slot].warning) if v.slot in fits else v for v in variants]
    guidance_notes = {core.Guidance.for_family(model_family(m), sampling.cfg).note for m, _ in patched.values()}  # refuses before sampling

    bar = comfy.utils.ProgressBar(len(rows) * len(variants))
    batches = [sample_column(*patched[v.slot], vae, rows, prompts.prompts, sampling, bar) for v in variants]
    record = core.provenance_record(variants, sampling.to_dict(), prompts.prompts, prompts.seeds,
                                    _model_sources(hidden, variants, hash_files), lora_hashes, _versions(), fits)
    comparison = Comparison(variants, rows, batches, sampling.to_dict(), record)
    for v in variants:
        if v.warning:
            comparison = comparison.with_note(f"column {v.slot}: LoRA {v.lora}: {v.warning}")
    for note in sorted(n for n in guidance_notes if n):
        comparison = comparison.with_note(note)
    h, w = batches[0].shape[1:3]
    by_variant = {v.slot: b for v, b in zip(variants, batches)}
    separate = [by_variant.get(slot, core.skipped_column_image(slot, h, w)) for slot in core.SLOTS]
    return (core.pil_to_image(comparison.grid()), *separate, comparison, core.provenance_text(record))


def run_compare_node(hidden: Hidden, model, clip, vae, prompts: str, seed: int, seeds_per_prompt: int,
                     hash_files: bool = True, **inputs):
    """The node's flat inputs grouped into the records run_compare takes."""
    sampling = Sampling(inputs["sampler_name"], inputs["scheduler"], int(inputs["steps"]), float(inputs["cfg"]),
                        int(inputs["width"]), int(inputs["height"]), inputs.get("negative", ""))
    return run_compare(hidden, model, clip, vae, PromptSet.parse(prompts, seed, seeds_per_prompt), sampling,
                       core.columns_from_inputs(inputs), hash_files)


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
        Out("images_b", "IMAGE", "one grey 'column B skipped' image when column B is skipped"),
        Out("images_c", "IMAGE", "one grey 'column C skipped' image when column C is skipped"),
        Out("comparison", COMPARISON, "connect to the ADT metric nodes"),
        Out("provenance", "STRING", "JSON: versions, settings, prompts, seeds, model and LoRA files with sha256"),
    ],
    run=run_compare_node,
    validate=validate_compare,
    fingerprint=fingerprint_compare,
)


# ---- metric nodes ----------------------------------------------------------------------

_CACHE: dict[str, tuple[str, Any]] = {}


def _cached(kind: str, paths: Sequence[str], load):
    """Keep the last loaded network of each kind (reloading CLIP-L per run is slow); one
    whose files were rewritten since (a retrained discriminator) is loaded again."""
    stamp = json.dumps([core.file_stamp(p) for p in paths])
    if kind not in _CACHE or _CACHE[kind][0] != stamp:
        _CACHE.pop(kind, None)
        _CACHE[kind] = (stamp, load())
    return _CACHE[kind][1]


def _device():
    import comfy.model_management as mm

    return mm.get_torch_device()


def _comparison_outputs(comparison: Comparison):
    return (comparison, core.pil_to_image(comparison.grid()), comparison.table_text())


def _skipped(comparison: Comparison, metric: str, err: Exception | str):
    """Missing weights or packages: say so in the table and keep going, no traceback."""
    log.warning("ADT %s skipped: %s", metric, err)
    return _comparison_outputs(comparison.with_note(f"{metric} skipped: {err}"))


@dataclasses.dataclass(frozen=True)
class Scorer:
    network: torch.nn.Module  # on ComfyUI's device while scoring, on the CPU otherwise
    score: Callable[[torch.Tensor], torch.Tensor]  # one column's images [B, 3, H, W] in [0, 1] -> [B]
    description: str


def _score(comparison: Comparison, metric: str, title: str, load: Callable[[], Scorer], skippable: tuple = ()):
    """What every metric node does: load its network (missing files or packages: a note
    instead of scores), score each column's images on ComfyUI's device, move it back."""
    try:
        scorer = load()
    except (PathRefused, FileNotFoundError, *skippable) as err:
        return _skipped(comparison, title, err)
    scorer.network.to(_device())
    try:
        values = [scorer.score(batch.permute(0, 3, 1, 2)) for batch in comparison.images]
    finally:
        scorer.network.to("cpu")
    return _comparison_outputs(comparison.with_scores(metric, values, scorer.description))


def _load_clip(name: str):
    from adt_plugin.eval.clip import load_clip

    path = metric_path("clip", name)
    return _cached("clip", [path], lambda: load_clip(path))


def run_clip_score(hidden: Hidden, comparison: Comparison, clip_model: str):
    prompts = [row.prompt for row in comparison.rows]

    def load():
        clip = _load_clip(clip_model)
        return Scorer(clip.model, lambda images: clip.clip_scores(clip.image_embeddings(images), prompts), clip.description)

    return _score(comparison, "clip", "CLIP score", load)


def run_aesthetic(hidden: Hidden, comparison: Comparison, clip_model: str, aesthetic_head: str):
    from adt_plugin.eval.aesthetic import load_aesthetic_head

    def load():
        clip = _load_clip(clip_model)
        path = metric_path("aesthetic", aesthetic_head)
        head = _cached("aesthetic", [path], lambda: load_aesthetic_head(path))
        return Scorer(clip.model, lambda images: head(clip.image_embeddings(images)), "LAION aesthetic v2 on " + clip.description)

    return _score(comparison, "aesthetic", "aesthetic score", load)


def run_hps(hidden: Hidden, comparison: Comparison, hps_weights: str):
    from adt_plugin.eval.hps import HpsUnavailable, load_hps

    prompts = [row.prompt for row in comparison.rows]

    def load():
        path = metric_path("hps", hps_weights)
        scorer = _cached("hps", [path], lambda: load_hps(path))
        return Scorer(scorer.model, lambda images: scorer.scores(list(images), prompts), scorer.description)

    return _score(comparison, "hps", "HPSv2", load, (HpsUnavailable,))


DINOV2_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}


def trained_backbone(disc_file: str) -> str:
    """Which DINOv2 a discriminator file says it was trained with, and how to get it."""
    from safetensors import safe_open

    try:
        with safe_open(disc_file, framework="pt") as handle:
            metadata = handle.metadata() or {}
        recorded = json.loads(metadata["discriminator_config"])["backbone_path"]
        hidden = json.loads(metadata["fingerprint"])["feature_channels"][0]
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it loads
        return f"use the DINOv2 it was trained with (adt train's default: dinov2-small, {missing_choice('dinov2')})"
    size = DINOV2_SIZES.get(int(hidden))
    hub = recorded if recorded.startswith("facebook/dinov2-") else (f"facebook/dinov2-{size}" if size else None)
    folder = hub.split("/")[-1] if hub else os.path.basename(recorded.rstrip("/\\"))
    get = f"; get it with: hf download {hub} --local-dir {folder}" if hub else ""
    return (f"{os.path.basename(disc_file)} was trained with DINOv2 {recorded!r} (width {hidden}): put it in "
            f"models/{METRICS_FOLDER} as {folder}/{get}")


def run_disc_score(hidden: Hidden, comparison: Comparison, discriminator: str, dinov2: str, reference_images=None):
    from adt_plugin.checkpoint import CheckpointMismatch
    from adt_plugin.eval.disc_score import load_discriminator_scorer

    refs = None if reference_images is None else list(reference_images.permute(0, 3, 1, 2))
    mode = "self-reference" if refs is None else f"against {len(refs)} reference images"
    try:
        path = disc_path(discriminator)
    except (PathRefused, FileNotFoundError) as err:
        return _skipped(comparison, "ADT discriminator score", err)
    unreadable = _unreadable_safetensors(path, f"discriminator {discriminator!r}")
    if unreadable:
        return _skipped(comparison, "ADT discriminator score", unreadable)

    def load():
        try:
            backbone_path = metric_path("dinov2", dinov2)
        except FileNotFoundError:
            raise FileNotFoundError(f"no DINOv2 {dinov2!r} in {', '.join(_folders(METRICS_FOLDER))}: {trained_backbone(path)}") from None
        try:
            scorer = _cached("disc", [path, backbone_path], lambda: load_discriminator_scorer(path, backbone_path=backbone_path))
        except CheckpointMismatch as err:  # another DINOv2 than the one it was trained with
            raise CheckpointMismatch(f"{err}. {trained_backbone(path)}") from None
        return Scorer(scorer.disc, lambda images: scorer.scores(images, references=refs), f"{scorer.description}; {mode}")

    return _score(comparison, "disc", "ADT discriminator score", load, (CheckpointMismatch,))


def _metric_stamp(key: str, name: str) -> list:
    try:
        return core.file_stamp(metric_path(key, name))
    except (PathRefused, FileNotFoundError):
        return [name, None]


def fingerprint_clip_score(cls, clip_model, **_):
    return json.dumps([_metric_stamp("clip", clip_model)])


def fingerprint_aesthetic(cls, clip_model, aesthetic_head, **_):
    return json.dumps([_metric_stamp("clip", clip_model), _metric_stamp("aesthetic", aesthetic_head)])


def fingerprint_hps(cls, hps_weights, **_):
    return json.dumps([_metric_stamp("hps", hps_weights)])


def fingerprint_disc(cls, discriminator, dinov2, **_):
    try:
        disc = core.file_stamp(disc_path(discriminator))
    except (PathRefused, FileNotFoundError):
        disc = [discriminator, None]
    return json.dumps([disc, _metric_stamp("dinov2", dinov2)])


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


DISC_DINOV2_MISSING = f"(missing: put the DINOv2 the discriminator was trained with, e.g. dinov2-small/, in models/{METRICS_FOLDER})"

_METRIC_OUTPUTS = [
    Out("comparison", COMPARISON, "the comparison with these scores added (chain further metric nodes)"),
    Out("grid", "IMAGE", "the grid with every score so far drawn on each cell and the means in the headers"),
    Out("table", "STRING", "Markdown: means ± std, win rates of every later column over every earlier one "
                           "(B over A, C over A, C over B), every image's scores"),
]
_COMPARISON_IN = In("comparison", COMPARISON, tooltip="from ADT A/B/C Compare or another ADT metric node")

CLIP_SCORE = NodeSpec(
    "ADTClipScore", "ADT CLIP Score",
    "CLIP score (100 x cosine of image and prompt embeddings) of every image, with transformers' CLIP from models/adt_metrics.",
    [_COMPARISON_IN, In("clip_model", "COMBO", "clip-vit-large-patch14",
                        "a transformers CLIP folder in models/adt_metrics, or the hub id (downloaded once into the Hugging Face cache)",
                        options=lambda: _metric_choices("clip"))],
    _METRIC_OUTPUTS, run_clip_score, validate_clip_score, fingerprint_clip_score,
)
AESTHETIC = NodeSpec(
    "ADTAestheticScore", "ADT Aesthetic Score",
    "LAION aesthetic predictor v2 (1-10) on CLIP ViT-L/14 embeddings; both from models/adt_metrics.",
    [_COMPARISON_IN,
     In("clip_model", "COMBO", "clip-vit-large-patch14", options=lambda: _metric_choices("clip")),
     In("aesthetic_head", "COMBO", "sac+logos+ava1-l14-linearMSE.pth", options=lambda: _metric_choices("aesthetic"))],
    _METRIC_OUTPUTS, run_aesthetic, validate_aesthetic, fingerprint_aesthetic,
)
HPS = NodeSpec(
    "ADTHPSv2Score", "ADT HPSv2 Score",
    "Human Preference Score v2 (needs open_clip_torch); weights from models/adt_metrics.",
    [_COMPARISON_IN, In("hps_weights", "COMBO", "HPS_v2.1_compressed.pt", options=lambda: _metric_choices("hps"))],
    _METRIC_OUTPUTS, run_hps, validate_hps, fingerprint_hps,
)
DISC_SCORE = NodeSpec(
    "ADTDiscriminatorScore", "ADT Discriminator Score",
    "The ADT discriminator's own score of every image (its .adt_disc.safetensors beside the LoRA, on the DINOv2 "
    "it was trained with). Without reference images each image is its own reference (how it scores real images).",
    [_COMPARISON_IN,
     In("discriminator", "COMBO", None, f"a *{DISC_SUFFIX} file from models/loras", options=disc_choices),
     In("dinov2", "COMBO", "dinov2-small",
        "the DINOv2 it was trained with (adt train's default: facebook/dinov2-small): a folder in models/adt_metrics, "
        "or the hub id (downloaded once into the Hugging Face cache)",
        options=lambda: _metric_choices("dinov2", DISC_DINOV2_MISSING)),
     In("reference_images", "IMAGE", tooltip="real images to score against (optional)", optional=True)],
    _METRIC_OUTPUTS, run_disc_score, validate_disc, fingerprint_disc,
)

NODE_SPECS = [COMPARE, CLIP_SCORE, AESTHETIC, HPS, DISC_SCORE]
