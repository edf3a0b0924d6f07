"""What `adt train` builds before its loop, in bundles that do not change afterwards.

    checked = check_run(config, resume)        no weights: packages, folders, images, family, the state
    procs = start_processes(config)            accelerate: rank, world size, device
    model = load_model(config, family, procs)  pipeline, denoiser (+ LoRA), the core's model adapter
    data = load_data(config, report, model, procs)   dataset (+ caches), batch order, sample prompts
    optim = make_optimisation(config, model, procs)  optimizer, learning-rate schedule

Each step takes what it needs as arguments, so none can run before its inputs
exist; the loop (loop.py) holds nothing else but the strategy and its counters.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from ..decode import LatentDecoder
from ..distributed import broadcast_from_rank0
from ..families import FamilyAdapter, ModelFamily
from ..noise import prediction_type_of
from .config import ConfigError, RunConfig
from .data import (
    DECODE_VERSION,
    BatchOrder,
    ImageItem,
    ScanReport,
    TrainImages,
    assign_buckets,
    cache_key,
    file_fingerprint,
    make_buckets,
    prepare_image,
    scan_folder,
)
from .keymap import LAYOUTS
from .loading import ModelLoadError, check_single_file, detect_family, load_pipeline, resolve_dtype, set_attention
from .lora import add_lora
from .state import check_resume, read_trainer_json

Say = Callable[[str], None]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


# --- checks that need no weights ---------------------------------------------------


def check_environment(config: RunConfig) -> None:
    """Optional packages the config asks for, before anything is loaded."""
    if config.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # noqa: BLE001
            raise ConfigError(
                f"[train] optimizer = 'adamw8bit' needs bitsandbytes, which does not import here ({err}); "
                f"`pip install bitsandbytes` (CUDA machines), or set optimizer = 'adamw'"
            ) from err
    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("[train] mixed_precision = 'fp16' needs a CUDA device; use 'bf16' or 'no' on the CPU")
    if config.model.base_dtype == "fp8":
        if config.train.method != "lora":
            raise ConfigError(
                "[model] base_dtype = 'fp8' stores the frozen weights of a LoRA run in float8; a full fine-tune trains "
                "them (in float32): set train.method = 'lora' or base_dtype = 'auto'"
            )
        from diffusers import ModelMixin

        if not hasattr(torch, "float8_e4m3fn") or not hasattr(ModelMixin, "enable_layerwise_casting"):
            raise ConfigError(
                "[model] base_dtype = 'fp8' needs torch with float8 and diffusers with layerwise casting (>= 0.32); "
                "upgrade them or set base_dtype = 'auto'"
            )


def check_sampler_fits(config: RunConfig, family: ModelFamily) -> None:
    """Flow-matching families (SD3, FLUX, Z-Image) need a flow sampler, the others one
    for noise prediction (it is the rollout's and the sample grids'); the guidance value
    must be one the family's sampler uses. Checked before the model loads."""
    from ..samplers import SAMPLERS, resolve_sampler_name

    flow_sampler = SAMPLERS[resolve_sampler_name(config.adt.sampler)].flow
    if flow_sampler != family.flow:
        fitting = sorted(n for n, spec in SAMPLERS.items() if spec.flow == family.flow)
        raise ConfigError(
            f"[adt] sampler = {config.adt.sampler!r} does not fit a {family.name} model; use one of {', '.join(fitting)}"
        )
    try:
        family.guidance.check(config.adt.guidance_scale, family.label)
    except ValueError as err:
        raise ConfigError(f"[adt] guidance_scale: {err}") from None


def check_model_fits(config: RunConfig, family: ModelFamily) -> None:
    """What the family can load and save, before the model loads."""
    try:
        check_single_file(config.model, family)
    except ModelLoadError as err:
        raise ConfigError(str(err)) from None
    full_file = config.train.method == "full" and config.save.format == "safetensors"
    if full_file and family.lora.original not in LAYOUTS:
        raise ConfigError(
            f"[save] format = 'safetensors': no single-file (original) layout is known for {family.label}; "
            f"set save.format = 'diffusers' (a diffusers folder)"
        )


def unwritable_reason(folder: Path) -> Optional[str]:
    """Why files cannot be created in `folder` (made if missing), or None. Tried for real
    (a temporary file in the nearest existing folder), so read-only mounts and ACLs count."""
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(prefix=".adt-write-check.", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        return f"cannot create files in {existing} ({err.strerror or err})"
    return None


def check_writable(config: RunConfig) -> None:
    """The folders the run writes to, before anything is loaded or trained."""
    folders = [("train", "output_dir", config.output_dir), ("log", "dir", config.log_dir)]
    if config.data.cache_latents or config.data.cache_text:
        folders.append(("data", "cache_dir", config.cache_dir))
    for section, key, folder in folders:
        reason = unwritable_reason(folder)
        if reason:
            raise ConfigError(f"[{section}] {key} = {str(folder)!r}: {reason}; choose a folder this user can write to")


@dataclass(frozen=True)
class Checked:
    report: ScanReport  # the usable images and the skipped ones
    family: ModelFamily  # the model's (families/), or the one [model] family names
    saved: Optional[Mapping[str, Any]]  # the resumed state's trainer.json


def check_run(config: RunConfig, resume: Optional[Path] = None) -> Checked:
    """Everything that needs no weights, in the order a user fixes things; `--check` stops here."""
    check_environment(config)
    check_writable(config)
    report = scan_folder(config.data.folder, config.data.caption_extension, config.data.min_size)
    family = detect_family(config.model)
    check_model_fits(config, family)
    check_sampler_fits(config, family)
    saved = None
    if resume is not None:
        saved = read_trainer_json(resume)
        check_resume(Path(resume), saved, config, family.name)
    return Checked(report, family, saved)


# --- processes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Processes:
    accelerator: Any
    rank: int
    world: int
    device: torch.device
    main: bool

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def start_processes(config: RunConfig) -> Processes:
    from accelerate import Accelerator

    # Several processes without CUDA (torchrun / `accelerate launch --multi_gpu` on a CPU
    # machine): accelerate needs cpu=True to set them up as MULTI_CPU (gloo).
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=cpu_processes)
    return Processes(
        accelerator,
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.device,
        accelerator.is_main_process,
    )


# --- the model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    family: ModelFamily
    pipe: Any  # the diffusers pipeline (text encoders, VAE, tokenizers)
    denoiser: torch.nn.Module  # the UNet or transformer, trainable (LoRA or whole)
    params: tuple[torch.nn.Parameter, ...]  # what the optimizer trains, float32
    adapter: FamilyAdapter  # the core's ModelAdapter (unconditional = the empty prompt)
    decoder: LatentDecoder
    empty_text: Mapping[str, torch.Tensor]
    scheduler_config: Mapping[str, Any]
    prediction_type: str  # epsilon | v_prediction | flow
    weight_dtype: torch.dtype  # frozen weights and text conditioning
    latent_factor: int  # pixels per latent
    attention: str


def load_model(config: RunConfig, family: ModelFamily, procs: Processes, say: Say) -> Model:
    mixed = config.train.mixed_precision
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    if config.model.vae_dtype == "auto":
        vae_dtype = family.vae_dtype(weight_dtype)  # SDXL's VAE overflows in fp16: float32
    else:
        vae_dtype = resolve_dtype(config.model.vae_dtype)
    say(f"loading {family.name} model from {config.model.path}")
    # A full fine-tune keeps float32 master weights: load them as stored, not through bf16.
    full = config.train.method == "full"
    pipe = load_pipeline(config.model, family, torch.float32 if full else weight_dtype)
    denoiser = getattr(pipe, family.denoiser_attr)
    vae = pipe.vae.requires_grad_(False)
    if vae.dtype != vae_dtype:
        vae.to(dtype=vae_dtype)
    vae.to(procs.device)
    for name in TEXT_ENCODERS:
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.to(procs.device, weight_dtype).requires_grad_(False)
    attention = set_attention(pipe, denoiser, config.model.attention)
    scheduler_config = dict(pipe.scheduler.config)

    if full:
        params = list(denoiser.to(torch.float32).requires_grad_(True).parameters())
    else:
        if config.model.base_dtype == "fp8":  # before the LoRA: its own layers stay float32
            denoiser.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=weight_dtype)
        params = add_lora(denoiser, family, config.lora)
    for p in params:  # trainable weights in float32 whatever the base's dtype
        p.data = p.data.float()
    denoiser.to(procs.device)
    if config.train.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    broadcast_from_rank0(p.data for p in params)  # every process starts from rank 0's weights (DDP would)
    decoder = LatentDecoder(vae, gradient_checkpointing=config.train.gradient_checkpointing)
    with torch.no_grad():
        empty_text = family.empty_text(pipe, procs.device)
    adapter = FamilyAdapter(family, denoiser, scheduler_config, empty_text, decoder, procs.accelerator.autocast)
    prediction_type = prediction_type_of(scheduler_config)
    say(
        f"{family.name} ({prediction_type}), {config.train.method}: "
        f"{sum(p.numel() for p in params):,} trainable parameters; attention {attention}; "
        f"mixed precision {mixed}; {procs.world} process(es) on {procs.device}"
    )
    return Model(
        family=family,
        pipe=pipe,
        denoiser=denoiser,
        params=tuple(params),
        adapter=adapter,
        decoder=decoder,
        empty_text=empty_text,
        scheduler_config=scheduler_config,
        prediction_type=prediction_type,
        weight_dtype=weight_dtype,
        latent_factor=2 ** (len(vae.config.block_out_channels) - 1),
        attention=attention,
    )


# --- the data ----------------------------------------------------------------------


@dataclass(frozen=True)
class SamplePrompts:
    """The sample grid's prompts, encoded while the text encoders are still on the device."""

    conds: tuple[Mapping[str, torch.Tensor], ...]
    latent_shape: tuple[int, int, int]
    adapter: FamilyAdapter  # unconditional = the negative prompt (or the empty one)


@dataclass(frozen=True)
class Data:
    report: ScanReport
    dataset: TrainImages
    order: BatchOrder  # global batches (batch_size x processes), resumable at (epoch, index)
    samples: Optional[SamplePrompts]


def load_data(config: RunConfig, report: ScanReport, model: Model, procs: Processes, say: Say) -> Data:
    data_cfg = config.data
    buckets = (
        make_buckets(data_cfg.resolution, data_cfg.bucket_step, data_cfg.min_bucket_size, data_cfg.max_bucket_size)
        if data_cfg.buckets
        else [(data_cfg.resolution, data_cfg.resolution)]
    )
    latent_files = text_files = None
    if data_cfg.cache_latents or data_cfg.cache_text:
        sizes = [buckets[b] for b in assign_buckets(report.items, buckets)]
        if data_cfg.cache_latents:
            latent_files = cache_latents(config, report.items, sizes, model, procs, say)
        if data_cfg.cache_text:
            captions = {item.caption for item in report.items} | ({""} if data_cfg.caption_dropout else set())
            text_files = cache_text(config, sorted(captions), model, procs, say)
        procs.barrier()  # the main process filled what was missing; the others read
    dataset = TrainImages(
        report.items,
        buckets,
        config.train.seed,
        data_cfg.random_crop,
        data_cfg.flip,
        data_cfg.caption_dropout,
        latent_files=latent_files,
        text_files=text_files,
    )
    order = BatchOrder(dataset.entry_buckets, config.train.batch_size * procs.world, config.train.seed)
    samples = encode_sample_prompts(config, model, procs) if config.sample.prompts else None
    if data_cfg.cache_text:  # conditioning comes from the cache: the encoders can leave the device
        for name in TEXT_ENCODERS:
            if getattr(model.pipe, name, None) is not None:
                getattr(model.pipe, name).to("cpu")
    if data_cfg.cache_latents:
        model.pipe.vae.encoder.to("cpu")
    if procs.device.type == "cuda":
        torch.cuda.empty_cache()
    return Data(report, dataset, order, samples)


def cache_latents(
    config: RunConfig, items: list[ImageItem], sizes: list[tuple[int, int]], model: Model, procs: Processes, say: Say
) -> list[Path]:
    """One latent file per image (and bucket); the main process encodes what is missing."""
    from ..fileio import atomic_save_safetensors

    vae = model.pipe.vae
    folder = config.cache_dir / "latents"
    model_id = file_fingerprint(Path(config.model.path).expanduser())
    vae_config = json.dumps(dict(vae.config), sort_keys=True, default=str)
    vae_id = f"{model_id}|{config.model.vae_path}|{vae_config}|{vae.dtype}|{DECODE_VERSION}"
    files = [
        folder / f"{cache_key(file_fingerprint(item.path), size, vae_id)}.safetensors"
        for item, size in zip(items, sizes)
    ]
    if procs.main:
        missing = [i for i, f in enumerate(files) if not f.is_file()]
        if missing:
            say(f"caching latents of {len(missing)} images in {folder}")
        for i in missing:
            prepared = prepare_image(items[i].path, sizes[i])
            latents = model.family.encode_latents(vae, prepared.pixels[None])[0].cpu()
            size = torch.tensor([*prepared.original_size, *prepared.crop_top_left, *prepared.target_size])
            atomic_save_safetensors({"latents": latents, "size_cond": size}, files[i])
    return files


def cache_text(config: RunConfig, captions: list[str], model: Model, procs: Processes, say: Say) -> dict[str, Path]:
    """One conditioning file per caption; the main process encodes what is missing."""
    from ..fileio import atomic_save_safetensors

    folder = config.cache_dir / "text"
    text_id = f"{file_fingerprint(Path(config.model.path).expanduser())}|{model.family.name}|text"
    files = {caption: folder / f"{cache_key(caption, text_id)}.safetensors" for caption in captions}
    if procs.main:
        missing = [c for c, f in files.items() if not f.is_file()]
        if missing:
            say(f"caching text conditioning of {len(missing)} captions in {folder}")
        with torch.no_grad():
            for caption in missing:
                cond = model.family.encode_text(model.pipe, [caption], procs.device)
                atomic_save_safetensors({k: v[0].cpu() for k, v in cond.items()}, files[caption])
    return files


def encode_sample_prompts(config: RunConfig, model: Model, procs: Processes) -> SamplePrompts:
    sample, family, device = config.sample, model.family, procs.device
    height = sample.height or config.data.resolution
    width = sample.width or config.data.resolution
    size = torch.tensor([[height, width, 0, 0, height, width]])
    conds = []
    with torch.no_grad():
        for prompt in sample.prompts:
            cond = family.encode_text(model.pipe, [prompt], device)
            cond.update({k: v.to(device) for k, v in family.size_cond(size).items()})
            conds.append(cond)
        negative = model.empty_text
        if sample.negative_prompt:
            negative = family.encode_text(model.pipe, [sample.negative_prompt], device)
    adapter = FamilyAdapter(
        family, model.denoiser, model.scheduler_config, negative, model.decoder, procs.accelerator.autocast
    )
    # the VAE's latent channels (FLUX's transformer takes them packed: 4x as many inputs)
    channels = model.pipe.vae.config.latent_channels
    shape = (channels, height // model.latent_factor, width // model.latent_factor)
    return SamplePrompts(tuple(conds), shape, adapter)


# --- optimisation ------------------------------------------------------------------


@dataclass(frozen=True)
class Optimisation:
    optimizer: Any  # AdamW (or bitsandbytes' AdamW8bit) over model.params, prepared by accelerate
    lr_factor: Callable[[int], float]  # the schedule's factor at a step (diffusers' schedules)
    learning_rate: float
    scaler: Any  # fp16's grad scaler (accelerate's), else None

    def lr_at(self, step: int) -> float:
        """The scheduled learning rate at `step`, before the strategy's own factor."""
        return self.learning_rate * self.lr_factor(step)


def make_optimisation(config: RunConfig, model: Model, procs: Processes) -> Optimisation:
    from diffusers.optimization import get_scheduler

    train = config.train
    kwargs = dict(
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon,
        weight_decay=train.weight_decay,
    )
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(model.params, **kwargs)
    else:
        optimizer = torch.optim.AdamW(model.params, **kwargs)
    # diffusers' schedules are LambdaLR: the loop reads the factor at a step and sets the
    # rate itself before each step (a function of the step, so a resumed run, and one
    # resumed with another learning rate, gets the rate this config says).
    schedule = get_scheduler(
        train.lr_scheduler, optimizer, num_warmup_steps=train.lr_warmup_steps, num_training_steps=train.max_steps
    )
    prepared = procs.accelerator.prepare(optimizer)  # fp16: the grad scaler steps through it
    return Optimisation(prepared, schedule.lr_lambdas[0], train.learning_rate, procs.accelerator.scaler)


__all__ = [
    "Checked",
    "Data",
    "Model",
    "Optimisation",
    "Processes",
    "SamplePrompts",
    "check_environment",
    "check_model_fits",
    "check_run",
    "check_sampler_fits",
    "check_writable",
    "load_data",
    "load_model",
    "make_optimisation",
    "start_processes",
]
