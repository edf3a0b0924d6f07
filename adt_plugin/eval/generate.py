"""Generate the images `adt eval` compares: every model, the same prompts, seeds,
sampler and guidance; the same starting noise per seed.

A model is a diffusers folder or a single-file checkpoint (loaded offline by
the trainer's loader, `adt_plugin.train.loading`) plus an optional LoRA file
(kohya or diffusers keys; diffusers' `load_lora_weights` reads both; what it
cannot read at every size, sd-scripts' SD3 and FLUX files, is converted first).
Its family (families/) says the denoiser, the initial noise's layout (FLUX takes
it packed) and how the pipeline is given the guidance value (CFG with the
negative prompt, FLUX.1-dev's embedded guidance, none for schnell). Each image
is written atomically with its generation record in the PNG (`adt_eval` text
chunk); a later run reuses an image only if that record matches what it would
generate now, so an interrupted run resumes and a changed setting regenerates.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from PIL import Image

from .images import save_png

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RECORD_KEY = "adt_eval"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model_path: str
    lora_path: Optional[str] = None
    lora_scale: float = 1.0

    def identity(self) -> dict:
        """What must match for an image to be reused (paths, and the LoRA file's size and time)."""
        out = {"model": str(Path(self.model_path).resolve()), "lora": None, "lora_scale": self.lora_scale}
        if self.lora_path:
            lora = Path(self.lora_path).resolve()
            stat = lora.stat() if lora.exists() else None
            out["lora"] = [str(lora), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
        return out

    def describe(self) -> str:
        if not self.lora_path:
            return self.model_path
        return f"{self.model_path} + {self.lora_path} @ {self.lora_scale:g}"


def parse_models(text: str, base_model: Optional[str] = None) -> list[ModelSpec]:
    """`base=./sd15,ft=./sd15+./ft.safetensors,adt=./sd15+./adt.safetensors@0.8`.

    NAME=MODEL[+LORA[@SCALE]]; with `base_model` given, MODEL may be left out
    (`base,ft=+./ft.safetensors`). A LoRA path may contain '@' unless a number follows it."""
    specs: list[ModelSpec] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not base_model and (not sep or not value.strip()):
            raise ValueError(f"--models entry {item!r} must look like NAME=MODEL[+LORA[@SCALE]]")
        if not NAME.match(name):
            raise ValueError(f"model name {name!r} may only use letters, digits, '_', '.', '-' (it names a folder)")
        model, plus, lora = value.strip().partition("+")
        model = model.strip() or (base_model or "")
        if not model:
            raise ValueError(f"--models entry {item!r} names no model (give MODEL, or --base-model)")
        lora, scale = lora.strip(), 1.0
        head, at, tail = lora.rpartition("@")
        if at and _is_number(tail):
            lora, scale = head.strip(), float(tail)
        if plus and not lora:
            raise ValueError(f"--models entry {item!r}: nothing after '+' (expected a LoRA file)")
        specs.append(ModelSpec(name, model, lora or None, scale))
    names = [s.name for s in specs]
    if not specs:
        raise ValueError("--models names no model")
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    return specs


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class SamplingSettings:
    sampler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 7.0  # CFG scale, or FLUX.1-dev's embedded guidance (0 for schnell / turbo)
    width: Optional[int] = None  # None: the model's default
    height: Optional[int] = None
    negative_prompt: str = ""
    seeds: tuple[int, ...] = (0,)


@dataclass
class ImageJob:
    prompt_index: int
    prompt: str
    seed: int
    path: Path
    record: dict = field(default_factory=dict)


def image_path(out_dir: Path, model: str, prompt_index: int, seed: int) -> Path:
    return out_dir / "images" / model / f"p{prompt_index:05d}_s{seed}.png"


def plan_jobs(out_dir: Path, spec: ModelSpec, prompts: Sequence[str], settings: SamplingSettings) -> list[ImageJob]:
    """One job per (prompt, seed), each with the record its image must carry."""
    common = {"model": spec.identity(), "settings": {k: v for k, v in asdict(settings).items() if k != "seeds"}}
    return [
        ImageJob(p, prompt, seed, image_path(out_dir, spec.name, p, seed), {**common, "prompt": prompt, "seed": seed})
        for p, prompt in enumerate(prompts)
        for seed in settings.seeds
    ]


def read_record(path: Path) -> Optional[dict]:
    try:
        with Image.open(path) as image:
            text = image.text.get(RECORD_KEY) if hasattr(image, "text") else None
        return json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - an unreadable or half-written file is simply regenerated
        return None


def is_done(job: ImageJob) -> bool:
    return job.path.is_file() and read_record(job.path) == json.loads(json.dumps(job.record))


def save_image(image: Image.Image, job: ImageJob) -> None:
    save_png(image, job.path, {RECORD_KEY: json.dumps(job.record)})


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """[len(seeds), C, h, w] float32; drawn on the CPU so a seed gives the same noise
    on every device and for every model."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


def model_family(spec: ModelSpec, config_dir: str = ""):
    """The family of `spec`'s model (configs and keys only; nothing loads)."""
    from ..train.config import ModelConfig
    from ..train.loading import ModelLoadError, check_single_file, detect_family

    model = ModelConfig(path=spec.model_path, config_dir=config_dir)
    try:
        family = detect_family(model)
        check_single_file(model, family)
    except ModelLoadError as err:
        raise FileNotFoundError(f"model {spec.name!r}: {err}") from err
    return family


def load_pipeline(spec: ModelSpec, device, dtype, sampler: str, steps: int, config_dir: str = ""):
    """(family, pipeline): a diffusers pipeline from a local folder or single-file
    checkpoint (through the trainer's offline loader), with the LoRA applied and the
    sampler built from the model's own scheduler config."""
    from ..samplers import build_scheduler
    from ..train.config import ModelConfig
    from ..train.loading import ModelLoadError, check_single_file, detect_family
    from ..train.loading import load_pipeline as load_local

    model = ModelConfig(path=spec.model_path, config_dir=config_dir)
    try:
        family = detect_family(model)
        check_single_file(model, family)
        pipe = load_local(model, family, dtype)
    except ModelLoadError as err:
        raise FileNotFoundError(f"model {spec.name!r}: {err}") from err
    if spec.lora_path:
        from .lora_file import LoraFileError, load_lora

        try:
            load_lora(pipe, family, spec.lora_path, "adt_eval")
        except LoraFileError as err:
            raise LoraFileError(f"model {spec.name!r}: {err}") from err
        pipe.set_adapters(["adt_eval"], adapter_weights=[spec.lora_scale])
    # the pipeline sets the timesteps itself (FLUX: its sigmas and the shift for the size)
    pipe.scheduler = build_scheduler(pipe.scheduler.config, sampler, steps, family=family)
    pipe.set_progress_bar_config(disable=True)
    return family, pipe.to(device)


def latent_shape(pipe, family, width: Optional[int], height: Optional[int]) -> tuple[tuple[int, int, int], int, int]:
    """(latent [C, h, w], width, height) for the pipeline's VAE: C is the VAE's latent
    channels (FLUX's transformer takes them packed 2x2: its in_channels is 4 C)."""
    denoiser = getattr(pipe, family.denoiser_attr)
    scale = getattr(pipe, "vae_scale_factor", 8)
    sample = denoiser.config.get("sample_size") or getattr(pipe, "default_sample_size", None) or 1024 // scale
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    width, height = width or sample * scale, height or sample * scale
    multiple = scale * family.latent_multiple
    if width % multiple or height % multiple:
        raise ValueError(f"width and height must be multiples of {multiple} for this {family.label} model, got {width}x{height}")
    return (pipe.vae.config.latent_channels, height // scale, width // scale), width, height


def generate_model(
    spec: ModelSpec,
    jobs: Sequence[ImageJob],
    settings: SamplingSettings,
    device,
    dtype,
    batch_size: int = 4,
    progress: Optional[Callable[[int], None]] = None,
    config_dir: str = "",
) -> int:
    """Generate the jobs not done yet; return how many were generated."""
    todo = [job for job in jobs if not is_done(job)]
    if not todo:
        return 0
    family, pipe = load_pipeline(spec, device, dtype, settings.sampler, settings.steps, config_dir)
    shape, width, height = latent_shape(pipe, family, settings.width, settings.height)
    by_prompt: dict[int, list[ImageJob]] = {}
    for job in todo:
        by_prompt.setdefault(job.prompt_index, []).append(job)
    for group in by_prompt.values():
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            latents = initial_noise([j.seed for j in batch], shape).to(device=device, dtype=dtype)
            out = pipe(
                prompt=[j.prompt for j in batch],
                latents=family.pipeline_latents(latents),
                num_inference_steps=settings.steps,
                **family.pipeline_guidance(settings.guidance_scale, settings.negative_prompt, len(batch)),
                width=width,
                height=height,
                output_type="pil",
            )
            for job, image in zip(batch, out.images):
                save_image(image, job)
            if progress:
                progress(len(batch))
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(todo)
