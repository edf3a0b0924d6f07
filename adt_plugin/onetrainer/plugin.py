"""Switch ADT into a running OneTrainer (called by the shim install.py places).

OneTrainer imports every module in modules/modelSetup/ when modules.util.create
is first imported (factory.import_dir), before any TrainConfig is built by
scripts/train.py or the UI. The shim calls `install()`, which (through
`internals.py`, the one module that touches OneTrainer's internals):

  * gives TrainConfig an `adt` section (config.py) that survives load / save / presets,
    whose unknown keys and wrongly typed values are errors;
  * replaces the registered SD1.x/2.x, SDXL and SD3 LoRA and fine-tune model setups
    with ADT subclasses (setup.py), which act only when `adt.enabled` is true;
  * replaces their model savers with subclasses that write the discriminator into
    backups and beside saved models;
  * checks ADT's settings and finds its backbone (downloading a hub id once;
    `setup.check_before_loading`) when a training run creates its model loader, before
    the model is loaded;
  * in the Qt GUI, adds an "ADT" tab (gui.py).
"""

from __future__ import annotations

import sys
from typing import Any

from .families import FAMILIES, TRAINING_METHODS, Family, family_of
from .setup import check_before_loading, wrap_saver_class, wrap_setup_class


def wrapper_for(wrap_class) -> Any:
    """`internals.replace_registered`'s callback: our subclass for the model types and
    training methods ADT trains (one per class and family), None for everything else."""
    made: dict[tuple[type, str], type] = {}

    def wrap(model_type: Any, method: Any, cls: type) -> type | None:
        family: Family | None = family_of(model_type)
        if family is None or getattr(method, "name", None) not in TRAINING_METHODS:
            return None
        if (cls, family.name) not in made:
            made[cls, family.name] = wrap_class(cls, family)
        return made[cls, family.name]

    return wrap


def install() -> None:
    """Idempotent: a second call changes nothing."""
    from modules.modelSaver.BaseModelSaver import BaseModelSaver
    from modules.modelSetup.BaseModelSetup import BaseModelSetup
    from modules.trainer.BaseTrainer import BaseTrainer
    from modules.util import factory
    from modules.util.config.BaseConfig import BaseConfig
    from modules.util.config.TrainConfig import TrainConfig

    from . import internals
    from .config import add_section, check_train_config_data, make_section_class

    _import_registered_modules()
    if getattr(TrainConfig, "_adt_section_class", None) is None:
        internals.patch_train_config(TrainConfig, make_section_class(BaseConfig), add_section, check_train_config_data)
    internals.replace_registered(factory, BaseModelSetup, wrapper_for(wrap_setup_class))
    internals.replace_registered(factory, BaseModelSaver, wrapper_for(lambda cls, family: wrap_saver_class(cls)))
    internals.check_at_start(BaseTrainer, check_before_loading)
    internals.one_line_settings_errors()
    if "modules.ui.BaseTrainUIView" in sys.modules:  # the GUI is starting
        _install_gui(internals)


def _install_gui(internals: Any) -> None:
    from modules.ui.BaseTrainUIView import BaseTrainUIView
    from modules.ui.TopBarController import TopBarController

    from .config import loading_from
    from .gui import extend_train_window

    internals.extend_train_window(BaseTrainUIView, extend_train_window)
    internals.name_loaded_files(TopBarController, loading_from)


def _import_registered_modules() -> None:
    """The setups and savers register themselves on import; make sure ours are imported
    before we wrap them (OneTrainer's own import_dir skips modules already imported)."""
    import importlib

    for family in FAMILIES.values():
        for module in family.modules:
            importlib.import_module(module)


__all__ = ["install", "wrapper_for"]
