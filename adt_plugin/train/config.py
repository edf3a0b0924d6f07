"""The run's configuration: one TOML file, sections mapped onto dataclasses.

    [model]  what to train          [data]   the image folder
    [train]  optimisation           [lora]   LoRA shape (method = "lora")
    [save]   outputs, keep-last-N   [sample] sample grids
    [log]    TensorBoard            [adt]    every AdtSettings field (strategy, sampler, ...)

Layers, later wins: a preset (`--preset NAME` or `preset = "NAME"` at the top of
the file; a preset may `extends` another), the user's file, `key=value` overrides
(`train.learning_rate=1e-5`, `adt.strategy=ft`). Everything is validated here,
before any model or image is touched: an unknown section or key, or a value of the
wrong type, is an error naming the key, where it came from and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..families import FAMILIES as FAMILY_MODULES
from ..settings import AdtSettings, SettingsError, coerce_fields

if sys.version_info >= (3, 11):
    import tomllib as _toml

    def _parse_toml(text: str) -> dict:
        return _toml.loads(text)
else:  # Python 3.10: the `toml` package (a dependency)
    import toml as _toml

    def _parse_toml(text: str) -> dict:
        return _toml.loads(text)


FAMILIES = ("auto", *FAMILY_MODULES)  # auto: found from the model (families.family_for)
METHODS = ("lora", "full")
PRECISIONS = ("no", "fp16", "bf16")
DTYPES = ("auto", "fp32", "fp16", "bf16")


class ConfigError(SettingsError):
    """A bad configuration (file, preset or override), with where and what to do."""


def _one_of(section: str, name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"[{section}] {name} must be one of {', '.join(allowed)}; got {value!r}")


def _at_least(section: str, name: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"[{section}] {name} must be >= {low}; got {value}")


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # a diffusers folder or a single-file .safetensors checkpoint
    family: str = "auto"  # auto | a families name: sd1 sd2 sdxl sd3 flux_dev flux_schnell zimage zimage_turbo
    # Single-file checkpoints need the diffusers configs and tokenizers of their
    # model (a folder, e.g. the model repo downloaded without weights).
    config_dir: str = ""
    vae_path: str = ""  # another VAE (diffusers folder or single file)
    prediction_type: str = ""  # override the model's: epsilon | v_prediction (SD2-768 single files)
    vae_dtype: str = "auto"  # auto: fp32 for SDXL under fp16 (its VAE overflows), else the weights' dtype
    attention: str = "auto"  # auto (xformers if installed, else SDPA) | sdpa | xformers
    # LoRA only: the frozen denoiser stored in float8 (e4m3), each layer cast to the
    # training dtype for its forward (diffusers' layerwise casting); halves a bf16 base
    base_dtype: str = "auto"  # auto: the training dtype | fp8

    def __post_init__(self):
        _one_of("model", "family", self.family, FAMILIES)
        _one_of("model", "vae_dtype", self.vae_dtype, DTYPES)
        _one_of("model", "attention", self.attention, ("auto", "sdpa", "xformers"))
        _one_of("model", "base_dtype", self.base_dtype, ("auto", "fp8"))
        _one_of("model", "prediction_type", self.prediction_type, ("", "epsilon", "v_prediction"))


@dataclass(frozen=True)
class DataConfig:
    folder: str = ""  # images with same-name caption files; `10_name` sub-folders repeat 10x
    resolution: int = 512
    caption_extension: str = ".txt"
    buckets: bool = True  # aspect-ratio buckets (else square crops)
    bucket_step: int = 64
    min_bucket_size: int = 0  # 0: resolution / 2
    max_bucket_size: int = 0  # 0: resolution * 2
    min_image_size: int = 0  # shorter side below this: skipped (0: resolution / 2)
    random_crop: bool = False
    flip: bool = False
    caption_dropout: float = 0.0  # fraction of captions replaced by "" (the unconditional prompt)
    cache_latents: bool = False
    cache_text: bool = False
    cache_dir: str = ""  # default: <output_dir>/cache
    workers: int = 0  # DataLoader worker processes

    @property
    def min_size(self) -> int:
        """The shorter side below which an image is skipped."""
        return self.min_image_size or self.resolution // 2

    def __post_init__(self):
        _at_least("data", "resolution", self.resolution, 32)
        _at_least("data", "bucket_step", self.bucket_step, 8)
        _at_least("data", "workers", self.workers, 0)
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"[data] caption_dropout must be in [0, 1); got {self.caption_dropout}")
        if self.cache_latents and (self.random_crop or self.flip):
            raise ConfigError(
                "[data] cache_latents stores one latent per image, so random_crop and flip cannot vary it; "
                "turn cache_latents off or set random_crop = false and flip = false"
            )


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "outputs"
    output_name: str = "adt"
    method: str = "lora"  # lora | full (the whole denoiser)
    max_steps: int = 1000
    batch_size: int = 1  # per process
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0: no clipping
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False  # the denoiser's own (block-level) checkpointing
    seed: int = 0
    max_nonfinite_steps: int = 10  # stop after this many non-finite losses in a row

    def __post_init__(self):
        _one_of("train", "method", self.method, METHODS)
        _one_of("train", "mixed_precision", self.mixed_precision, PRECISIONS)
        _one_of("train", "optimizer", self.optimizer, ("adamw", "adamw8bit"))
        _one_of(
            "train",
            "lr_scheduler",
            self.lr_scheduler,
            ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
        )
        for name in ("max_steps", "batch_size", "max_nonfinite_steps"):
            _at_least("train", name, getattr(self, name), 1)
        _at_least("train", "lr_warmup_steps", self.lr_warmup_steps, 0)
        if self.learning_rate <= 0:
            raise ConfigError(f"[train] learning_rate must be > 0; got {self.learning_rate}")
        if not self.output_name or "/" in self.output_name or "\\" in self.output_name:
            raise ConfigError(f"[train] output_name must be a plain file name; got {self.output_name!r}")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0  # scale = alpha / rank, as in kohya and peft
    # Module names (suffixes, peft style). Empty: every linear layer of the attention
    # blocks, what sd-scripts trains by default for the family.
    target_modules: tuple[str, ...] = ()
    dropout: float = 0.0

    def __post_init__(self):
        _at_least("lora", "rank", self.rank, 1)
        if self.alpha <= 0:
            raise ConfigError(f"[lora] alpha must be > 0; got {self.alpha}")


@dataclass(frozen=True)
class SaveConfig:
    every_n_steps: int = 0  # 0: only at the end
    keep_last: int = 0  # keep the newest N step saves (and their discriminators, states); 0: all
    format: str = "safetensors"  # full fine-tunes: safetensors (one file) | diffusers (a folder)
    precision: str = "fp16"  # dtype of saved weights: fp32 | fp16 | bf16
    state: bool = True  # save a resumable state with every step save

    def __post_init__(self):
        _at_least("save", "every_n_steps", self.every_n_steps, 0)
        _at_least("save", "keep_last", self.keep_last, 0)
        _one_of("save", "format", self.format, ("safetensors", "diffusers"))
        _one_of("save", "precision", self.precision, ("fp32", "fp16", "bf16"))


@dataclass(frozen=True)
class SampleConfig:
    every_n_steps: int = 0  # 0: no sample grids (besides none at the start)
    prompts: tuple[str, ...] = ()
    seed: int = 0
    width: int = 0  # 0: data.resolution
    height: int = 0
    negative_prompt: str = ""

    def __post_init__(self):
        _at_least("sample", "every_n_steps", self.every_n_steps, 0)
        if self.every_n_steps and not self.prompts:
            raise ConfigError('[sample] every_n_steps is set but prompts is empty; add prompts = ["..."]')


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = True
    dir: str = ""  # default: <output_dir>/logs
    every_n_steps: int = 1

    def __post_init__(self):
        _at_least("log", "every_n_steps", self.every_n_steps, 1)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "lora": LoraConfig,
    "save": SaveConfig,
    "sample": SampleConfig,
    "log": LogConfig,
    "adt": AdtSettings,
}
TOP_LEVEL_KEYS = ("preset", "extends", "description")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)
    adt: AdtSettings = field(default_factory=AdtSettings)
    sources: tuple[str, ...] = ()  # where the values came from, in order (for the record)

    @property
    def output_dir(self) -> Path:
        return Path(os.path.expanduser(self.train.output_dir))

    @property
    def cache_dir(self) -> Path:
        return Path(os.path.expanduser(self.data.cache_dir)) if self.data.cache_dir else self.output_dir / "cache"

    @property
    def log_dir(self) -> Path:
        return Path(os.path.expanduser(self.log.dir)) if self.log.dir else self.output_dir / "logs"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        return {
            name: {f.name: plain(getattr(getattr(self, name), f.name)) for f in fields(SECTIONS[name])}
            for name in SECTIONS
        }

    def check_required(self) -> None:
        """The keys no preset can supply; checked once all layers are merged."""
        if not self.model.path:
            raise ConfigError("[model] path is required: a diffusers folder or a single-file .safetensors checkpoint")
        if not self.data.folder:
            raise ConfigError("[data] folder is required: a folder of images with same-name .txt captions")


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Section-wise merge: keys of `top` replace those of `base`."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        return _parse_toml(path.read_text(encoding="utf-8"))
    except Exception as err:  # noqa: BLE001 - tomllib / toml raise different types
        raise ConfigError(f"{path} is not valid TOML: {err}") from err


def check_layout(raw: Mapping[str, Any], source: str) -> None:
    """Known sections (and top-level keys) only, each section a table."""
    for key, value in raw.items():
        if key in TOP_LEVEL_KEYS:
            if not isinstance(value, str):
                raise ConfigError(f"{source}: {key} must be a string; got {value!r}")
            continue
        if key not in SECTIONS:
            close = difflib.get_close_matches(key, [*SECTIONS, *TOP_LEVEL_KEYS], n=1)
            hint = (
                f"; did you mean [{close[0]}]?" if close else f"; sections are {', '.join(f'[{s}]' for s in SECTIONS)}"
            )
            raise ConfigError(f"{source}: unknown section or key {key!r}{hint}")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a section ([{key}]); got {value!r}")
        try:
            coerce_fields(SECTIONS[key], value, f"{source} [{key}]")  # names the bad key and the closest one
        except SettingsError as err:
            raise ConfigError(str(err)) from None


def parse_override(text: str | tuple[str, str, Any]) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value). The value is read as TOML
    (numbers, true/false, ["lists"], "strings"); anything else is a plain string.
    A (section, key, value) tuple (from a command-line flag) passes through."""
    if isinstance(text, tuple):
        return text
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. train.learning_rate=1e-5)")
    name, value_text = text.split("=", 1)
    if "." not in name:
        raise ConfigError(f"override {text!r}: name a section and a key, e.g. train.{name.strip()}={value_text}")
    section, key = (part.strip() for part in name.split(".", 1))
    try:
        value = _parse_toml(f"v = {value_text.strip()}")["v"]
    except Exception:  # noqa: BLE001 - a bare word or a path: take it as a string
        value = value_text.strip()
    return section, key, value


def load_layers(
    config_path: Optional[str | os.PathLike] = None,
    preset: Optional[str] = None,
    overrides: Sequence[str | tuple[str, str, Any]] = (),
) -> tuple[dict[str, Any], list[str]]:
    """The merged raw mapping and the list of its sources, every layer checked."""
    from .presets import preset_layers

    user: dict[str, Any] = {}
    if config_path is not None:
        user = read_toml(config_path)
        check_layout(user, str(config_path))
    preset = preset or user.get("preset")
    merged: dict[str, Any] = {}
    sources: list[str] = []
    if preset:
        for name, raw in preset_layers(preset):
            merged = merge(merged, raw)
            sources.append(f"preset {name}")
    if config_path is not None:
        merged = merge(merged, user)
        sources.append(str(config_path))
    for override in overrides:
        section, key, value = parse_override(override)
        text = f"{section}.{key}={value!r}" if isinstance(override, tuple) else override
        layer = {section: {key: value}}
        check_layout(layer, f"override {text!r}")
        merged = merge(merged, layer)
        sources.append(f"override {text}")
    return merged, sources


def build_run_config(raw: Mapping[str, Any], sources: Sequence[str] = ()) -> RunConfig:
    check_layout(raw, "config")
    values: dict[str, Any] = {}
    where = " + ".join(sources) or "config"
    for name, cls in SECTIONS.items():
        section = raw.get(name, {})
        try:
            if cls is AdtSettings:
                values[name] = AdtSettings.from_mapping(section, source=f"{where} [adt]")
            else:
                values[name] = cls(**coerce_fields(cls, section, f"{where} [{name}]"))
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:  # SettingsError included: one error type for the caller
            message = str(err)
            raise ConfigError(message if f"[{name}]" in message else f"{where} [{name}]: {message}") from None
    return RunConfig(**values, sources=tuple(sources))


def load_run_config(
    config_path: Optional[str | os.PathLike] = None,
    preset: Optional[str] = None,
    overrides: Sequence[str | tuple[str, str, Any]] = (),
    require: bool = True,
) -> RunConfig:
    if config_path is None and not preset:
        raise ConfigError("give a config file (--config run.toml), a preset (--preset NAME), or both")
    raw, sources = load_layers(config_path, preset, overrides)
    config = build_run_config(raw, sources)
    if require:
        config.check_required()
    return config


def replace_section(config: RunConfig, section: str, **changes: Any) -> RunConfig:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def config_from_dict(values: Mapping[str, Any]) -> RunConfig:
    """The inverse of RunConfig.to_dict (a resumed run reads its saved config)."""
    return build_run_config(values, ("saved state",))
