"""ADT inside OneTrainer's model setups (SD1.x/2.x, SDXL, SD3; LoRA and fine-tune).

`wrap_setup_class` subclasses a registered setup (mirrors OneTrainer master @
23df3832, modules/modelSetup/BaseModelSetup.py and BaseStableDiffusion*Setup.py):

  setup_train_device  encodes the empty prompt once (text encoders brought to the
                      device for a moment) and keeps the VAE on the training device
                      to decode rollouts, also when latents are cached
  setup_model         builds the strategy (its own discriminator and AdamW, outside
                      OneTrainer's optimizer), gates the generator optimizer's step,
                      restores the discriminator from the backup being continued or
                      from beside the LoRA being loaded
  predict             runs OneTrainer's predict up to its denoiser call to take the
                      conditioning exactly as OneTrainer builds it, then runs ADT
                      through that same denoiser call
  calculate_loss      returns ADT's loss for the loop to back-propagate
  report_to_tensorboard adds ADT's scalars

GenericTrainer steps the optimizer after every accumulation window. On
discriminator-only windows the loss gives every trainable parameter an exact zero
gradient (OneTrainer's GradScaler then finds no inf and calls `step`), and the
gate skips that step, so neither AdamW's momentum nor its weight decay moves the
weights; the LR scheduler, EMA and progress still advance once per window.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

import torch

from ..bridge import FunctionAdapter, GeneratorStepGate, StrategyRunner, start_line
from ..checkpoint import disc_path_for
from ..decode import LatentDecoder
from ..settings import AdtSettings, SettingsError
from ..strategies import build_strategy, preflight
from .config import SECTION, settings_from_section
from .families import FAMILIES, TRAINING_METHODS, Family, capture_denoiser_call, family_of, output_tensor

log = logging.getLogger("adt_plugin.onetrainer")

BACKUP_FILE = "adt_disc.safetensors"  # inside every backup folder (ModelFormat.INTERNAL)


def adt_enabled(config: Any) -> bool:
    section = getattr(config, SECTION, None)
    return bool(section is not None and section.enabled)


# OneTrainer options that shape its own diffusion loss, with their defaults (TrainConfig @ 23df3832).
# ADT's strategies draw their own timesteps and noise and compute their own loss: these do not apply.
LOSS_OPTIONS = (
    ("mse_strength", 1.0), ("mae_strength", 0.0), ("log_cosh_strength", 0.0), ("huber_strength", 0.0),
    ("loss_weight_fn", "CONSTANT"), ("loss_scaler", "NONE"),
    ("offset_noise_weight", 0.0), ("perturbation_noise_weight", 0.0),
    ("timestep_distribution", "UNIFORM"), ("min_noising_strength", 0.0), ("max_noising_strength", 1.0),
    ("noising_weight", 0.0), ("noising_bias", 0.0), ("timestep_shift", 1.0), ("dynamic_timestep_shifting", False),
)


def ignored_loss_options(config: Any) -> list[str]:
    """`name=value` for each OneTrainer loss option set away from its default."""
    ignored = []
    for name, default in LOSS_OPTIONS:
        value = getattr(config, name, default)
        shown = getattr(value, "name", value)  # enums by name
        if shown != default:
            ignored.append(f"{name}={shown}")
    return ignored


def check_before_loading(config: Any) -> Optional[AdtSettings]:
    """Everything about ADT that can be checked before OneTrainer loads the model (run
    where GenericTrainer.start() creates its model loader, see plugin.py): the settings,
    what ADT refuses, and the models the settings name (the backbone, found or downloaded
    now; taps against its depth). Raises SettingsError or hub.ModelNotFound with one line
    saying what to change, warns about OneTrainer loss options ADT ignores; returns the
    settings (None when ADT is off). Checks that need the model come later, in setup_model."""
    settings = checked_settings(config)
    if settings is None:
        return None
    ignored = ignored_loss_options(config)
    if ignored:
        log.warning("ADT: these OneTrainer loss options shape OneTrainer's own loss; ADT's strategy %s "
                    "ignores them: %s", settings.strategy, ", ".join(ignored))
    from huggingface_hub import constants

    # what GenericTrainer.start applies right after this (huggingface_util.configure_hub)
    if getattr(config, "offline_mode", False):
        constants.HF_HUB_OFFLINE = True
    if getattr(config, "huggingface_cache_dir", ""):
        constants.HF_HUB_CACHE = config.huggingface_cache_dir
    for line in preflight(settings, echo=lambda line: print(f"ADT: {line}"), prefix=f"{SECTION}."):
        print(f"ADT: {line}")
    return settings


def checked_settings(config: Any) -> Optional[AdtSettings]:
    """The ADT settings of `config` (None when ADT is off), refusing what ADT cannot run with."""
    if not adt_enabled(config):
        return None
    model_type, method = getattr(config, "model_type", None), getattr(config, "training_method", None)
    if family_of(model_type) is None or getattr(method, "name", str(method)) not in TRAINING_METHODS:
        supported = ", ".join(f.label for f in FAMILIES.values())
        raise SettingsError(
            f"OneTrainer config [{SECTION}]: enabled is true, but ADT does not train "
            f"{getattr(model_type, 'name', model_type)} {getattr(method, 'name', method)} in OneTrainer "
            f"(it trains {supported}, LoRA or fine-tune); turn ADT off (adt.enabled = false) or pick one of those"
        )
    settings = settings_from_section(getattr(config, SECTION))
    if getattr(config, "masked_training", False):
        raise SettingsError("ADT: masked training is not supported (ADT's loss is on whole decoded images); "
                            "turn off 'Masked Training' or disable ADT (adt.enabled = false)")
    optimizer = getattr(config, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "fused_back_pass", False):
        raise SettingsError("ADT: 'Fused Back Pass' steps the optimizer inside backward, so discriminator-only "
                            "iterations could not be kept from moving the weights; turn it off")
    return settings


class AdtSetupMixin:
    adt_family: Family

    adt_runner: Optional[StrategyRunner] = None
    adt_gate: Optional[GeneratorStepGate] = None
    _adt_empty: Optional[dict] = None

    # -- devices: empty prompt once, VAE stays for decoding ---------------------------------
    def setup_train_device(self, model, config):
        super().setup_train_device(model, config)
        if not adt_enabled(config):
            return
        if self._adt_empty is None and settings_from_section(getattr(config, SECTION)).guidance_scale > 1.0:
            model.materialize(*model.model_type.text_encoder_parts())
            with torch.no_grad(), model.autocast_context:
                self._adt_empty = {k: v.detach() for k, v in self.adt_family.empty_prompt(model, config).items()}
            super().setup_train_device(model, config)  # put the text encoders back where OneTrainer wants them
        model.materialize("vae")

    # -- the strategy, the gate, restoring ------------------------------------------------
    def setup_model(self, model, config):
        super().setup_model(model, config)
        if not adt_enabled(config):
            return
        settings = checked_settings(config)  # again: a setup can also be used without GenericTrainer.start()
        self._adt_scheduler_config = self.adt_family.scheduler_config(model, config)
        strategy = build_strategy(settings, self._adt_scheduler_config, device=self.train_device,
                                  micro_batches=config.gradient_accumulation_steps)
        self.adt_runner = StrategyRunner(strategy)
        self._adt_decoder = LatentDecoder(model.vae)
        model.adt_runner = self.adt_runner  # the wrapped savers find it here
        self.adt_gate = GeneratorStepGate(model.optimizer, self.adt_runner)
        print(start_line(settings, self.adt_family.label))
        if self.adt_runner.has_discriminator:
            self._adt_restore(config)

    def _adt_restore(self, config) -> None:
        source = None
        if getattr(config, "continue_last_backup", False) and config.get_last_backup_path():
            backup = config.get_last_backup_path()
            source = os.path.join(backup, BACKUP_FILE)
            if not os.path.exists(source):
                log.warning("ADT: backup %s has no %s (made without ADT); training goes on with a fresh discriminator",
                            backup, BACKUP_FILE)
                return
        elif getattr(config, "lora_model_name", ""):
            beside = disc_path_for(config.lora_model_name) if not os.path.isdir(config.lora_model_name) \
                else os.path.join(config.lora_model_name, BACKUP_FILE)
            source = str(beside) if os.path.exists(beside) else None
        if source:
            self.adt_runner.load(source)
            print(f"ADT: discriminator restored from {source}")

    # -- the loss -------------------------------------------------------------------------
    def predict(self, model, batch, config, train_progress, *, deterministic=False):
        parent_predict = super().predict
        if self.adt_runner is None or deterministic or not torch.is_grad_enabled():
            return parent_predict(model, batch, config, train_progress, deterministic=deterministic)
        if any(str(t) == "PRIOR_PREDICTION" for t in batch.get("concept_type", [])):
            raise ValueError("ADT: prior-prediction concepts are not supported; remove them or disable ADT")
        family = self.adt_family
        denoiser = getattr(model, family.denoiser)
        call = capture_denoiser_call(
            denoiser, lambda: parent_predict(model, batch, config, train_progress, deterministic=deterministic)
        )

        def denoise(sample, timestep, cond):
            with model.autocast_context:
                return output_tensor(denoiser(**call.kwargs(sample, timestep, cond))).float()

        def decode(latents):
            # as OneTrainer's samplers decode (SDXL keeps fp16 autocast off for its VAE)
            with getattr(model, "vae_autocast_context", contextlib.nullcontext()):
                return self._adt_decoder(latents).float()

        adapter = FunctionAdapter(self._adt_scheduler_config, denoise, lambda c: self._adt_uncond(model, config, c), decode)
        params = [p for group in model.optimizer.param_groups for p in group["params"]]
        closes = (train_progress.global_step + 1) % max(1, config.gradient_accumulation_steps) == 0
        loss = self.adt_runner(adapter, family.clean_latents(model, batch), call.cond, zero_grad_params=params,
                               closes_window=closes)
        return {"adt_loss": loss, "loss_type": "adt"}

    def _adt_uncond(self, model, config, cond):
        live = self.adt_family.live_uncond and any(
            getattr(getattr(config, part, None), "train", False) for part in model.model_type.text_encoder_parts()
        )
        empty = self.adt_family.empty_prompt(model, config) if live else self._adt_empty
        if empty is None:
            raise RuntimeError("ADT: no empty-prompt conditioning for classifier-free guidance")
        batch = next(v for v in cond.values() if v is not None).shape[0]
        out = dict(cond)
        for key, value in empty.items():
            like = cond[key]
            out[key] = value.to(device=like.device, dtype=like.dtype).expand(batch, *value.shape[1:])
        return out

    def calculate_loss(self, model, batch, data, config):
        if "adt_loss" in data:
            return data["adt_loss"]
        return super().calculate_loss(model, batch, data, config)

    def report_to_tensorboard(self, model, config, scheduler, tensorboard):
        super().report_to_tensorboard(model, config, scheduler, tensorboard)
        if self.adt_runner is not None:
            step = model.train_progress.global_step
            for tag, value in self.adt_runner.logs.items():
                tensorboard.add_scalar(tag, value, step)


def wrap_setup_class(cls: type, family: Family) -> type:
    return type(f"Adt{cls.__name__}", (AdtSetupMixin, cls), {"adt_family": family, "__module__": __name__})


class AdtSaverMixin:
    """Writes the discriminator beside every model OneTrainer saves: into backup
    folders (ModelFormat.INTERNAL) as adt_disc.safetensors, beside files and
    diffusers folders as <name>.adt_disc.safetensors."""

    def save(self, model, model_type, output_model_format, output_model_destination, dtype):
        super().save(model, model_type, output_model_format, output_model_destination, dtype)
        runner = getattr(model, "adt_runner", None)
        if runner is None or not runner.has_discriminator:
            return
        if str(output_model_format) == "INTERNAL":
            path = os.path.join(output_model_destination, BACKUP_FILE)
        else:
            path = disc_path_for(output_model_destination)
        runner.save(path, {"model_file": os.path.basename(str(output_model_destination).rstrip("/\\"))})


def wrap_saver_class(cls: type) -> type:
    return type(f"Adt{cls.__name__}", (AdtSaverMixin, cls), {"__module__": __name__})


__all__ = [
    "AdtSaverMixin", "AdtSetupMixin", "BACKUP_FILE", "LOSS_OPTIONS", "adt_enabled", "check_before_loading", "checked_settings",
    "ignored_loss_options",
    "wrap_saver_class", "wrap_setup_class",
]
