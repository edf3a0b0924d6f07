"""Switch ADT into a running OneTrainer (called by the shim install.py places).

OneTrainer imports every module in modules/modelSetup/ when modules.util.create
is first imported (factory.import_dir), before any TrainConfig is built by
scripts/train.py or the UI. The shim calls `install()`, which:

  * gives TrainConfig an `adt` section (config.py) that survives load / save / presets;
  * replaces the registered SD1.x/2.x, SDXL and SD3 LoRA and fine-tune model setups
    with ADT subclasses (setup.py), which act only when `adt.enabled` is true;
  * replaces their model savers with subclasses that write the discriminator into
    backups and beside saved models;
  * checks ADT's settings and finds its backbone (downloading a hub id once) when
    the trainer creates its model loader, i.e. before the model loads.

Mirrors OneTrainer master @ 23df3832 (modules/util/factory.py keeps a list of
(args, kwargs, class) per base class; there is no public way to re-register).
"""

from __future__ import annotations

from typing import Any, Callable

from .families import FAMILIES, Family
from .setup import preflight_config, wrap_saver_class, wrap_setup_class

TRAINING_METHODS = ("LORA", "FINE_TUNE")


def replace_registered(factory: Any, base_cls: type, wrap: Callable[[type, Family], type]) -> list[tuple]:
    """Replace the classes registered for our model types and training methods; returns what changed."""
    registry = vars(factory)["__registry"]
    wrapped: dict[type, type] = {}
    changed = []
    for i, (args, kwargs, cls) in enumerate(registry.get(base_cls, [])):
        if kwargs or len(args) != 2 or getattr(cls, "_adt_wrapped", False):
            continue
        model_type, method = args
        family = next((f for f in FAMILIES.values() if getattr(model_type, "name", None) in f.model_types), None)
        if family is None or getattr(method, "name", None) not in TRAINING_METHODS:
            continue
        if cls not in wrapped:
            wrapped[cls] = wrap(cls, family)
            wrapped[cls]._adt_wrapped = True
        registry[base_cls][i] = (args, kwargs, wrapped[cls])
        changed.append((model_type, method, cls, wrapped[cls]))
    return changed


def install() -> None:
    """Idempotent: a second call changes nothing."""
    from modules.modelSaver.BaseModelSaver import BaseModelSaver
    from modules.modelSetup.BaseModelSetup import BaseModelSetup
    from modules.util import factory
    from modules.util.config.BaseConfig import BaseConfig
    from modules.util.config.TrainConfig import TrainConfig

    from .config import patch_train_config

    _import_registered_modules(factory)
    patch_train_config(TrainConfig, BaseConfig)
    replace_registered(factory, BaseModelSetup, wrap_setup_class)
    replace_registered(factory, BaseModelSaver, lambda cls, family: wrap_saver_class(cls))
    from modules.trainer.BaseTrainer import BaseTrainer

    check_before_loading(BaseTrainer)


def check_before_loading(trainer_class: type) -> None:
    """Run ADT's preflight (settings, backbone) when the trainer creates its model loader:
    GenericTrainer.start does that first, before it loads the model. Idempotent."""
    if getattr(trainer_class, "_adt_checks_first", False):
        return
    original = trainer_class.create_model_loader

    def create_model_loader(self):
        preflight_config(self.config)
        return original(self)

    trainer_class.create_model_loader = create_model_loader
    trainer_class._adt_checks_first = True


def _import_registered_modules(factory: Any) -> None:
    """The setups and savers register themselves on import; make sure ours are imported
    before we wrap them (OneTrainer's own import_dir skips modules already imported)."""
    import importlib

    for family in FAMILIES.values():
        for module in _MODULES[family.name]:
            importlib.import_module(module)


_MODULES = {
    "sd": ("modules.modelSetup.StableDiffusionLoRASetup", "modules.modelSetup.StableDiffusionFineTuneSetup",
           "modules.modelSaver.StableDiffusionLoRAModelSaver", "modules.modelSaver.StableDiffusionFineTuneModelSaver"),
    "sdxl": ("modules.modelSetup.StableDiffusionXLLoRASetup", "modules.modelSetup.StableDiffusionXLFineTuneSetup",
             "modules.modelSaver.StableDiffusionXLLoRAModelSaver", "modules.modelSaver.StableDiffusionXLFineTuneModelSaver"),
    "sd3": ("modules.modelSetup.StableDiffusion3LoRASetup", "modules.modelSetup.StableDiffusion3FineTuneSetup",
            "modules.modelSaver.StableDiffusion3LoRAModelSaver", "modules.modelSaver.StableDiffusion3FineTuneModelSaver"),
}

__all__ = ["check_before_loading", "install", "replace_registered"]
