"""Every place the plugin reaches into OneTrainer's internals, in one module.

OneTrainer has no plugin API. What follows was read from OneTrainer master @
23df3832e8f213d64c337e39f9365ba46e99fed0; a OneTrainer update that moves any of
these is caught here (and by tests/integration against a real checkout):

  modules/util/factory.py          module-level `__registry`: {base class: [(args, kwargs, class)]};
                                   no public way to replace a registered class
  modules/util/config/TrainConfig  `default_values()` (a staticmethod) builds every config;
                                   `from_dict` is BaseConfig's, which swallows a nested section's errors
  modules/trainer/BaseTrainer      `create_model_loader()` is the first thing GenericTrainer.start()
                                   creates, with `self.config` set; the model is loaded right after
  modules/ui/BaseTrainUIView       `__init__(components, controller, ui_state)` is called by the Qt
                                   window's __init__ before it builds its tabs in `_create_tabs()`
  modules/ui/TopBarController      `load_config_from_file(filename)` reads presets and configs in the GUI
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from ..hub import ModelNotFound
from ..settings import SettingsError

UPSTREAM = "Nerogar/OneTrainer@23df3832e8f213d64c337e39f9365ba46e99fed0"


def replace_registered(factory: Any, base_cls: type, wrap: Callable[[Any, Any, type], type | None]) -> list[tuple]:
    """Replace classes registered in OneTrainer's factory under `base_cls`.

    `wrap(model_type, training_method, cls)` returns the class to register instead, or
    None to leave the entry alone. Entries already replaced are skipped. Returns what
    changed."""
    registry = vars(factory)["__registry"]
    changed = []
    for i, (args, kwargs, cls) in enumerate(registry.get(base_cls, [])):
        if kwargs or len(args) != 2 or getattr(cls, "_adt_wrapped", False):
            continue
        new = wrap(*args, cls)
        if new is None:
            continue
        new._adt_wrapped = True
        registry[base_cls][i] = (args, kwargs, new)
        changed.append((*args, cls, new))
    return changed


def patch_train_config(train_config_class: type, section_class: type, add_section: Callable, check_data: Callable) -> None:
    """Every `TrainConfig.default_values()` carries the section; `TrainConfig.from_dict`
    checks the section's data first (BaseConfig.from_dict would print and swallow an error
    raised inside the section). Idempotent."""
    if getattr(train_config_class, "_adt_section_class", None) is not None:
        return
    default_values = train_config_class.default_values
    from_dict = train_config_class.from_dict

    def default_values_with_section():
        return add_section(default_values(), section_class)

    @functools.wraps(from_dict)
    def checked_from_dict(self, data, *args, **kwargs):
        check_data(data)
        return from_dict(self, data, *args, **kwargs)

    train_config_class.default_values = staticmethod(default_values_with_section)
    train_config_class.from_dict = checked_from_dict
    train_config_class._adt_section_class = section_class


def check_at_start(base_trainer_class: type, check: Callable[[Any], None]) -> None:
    """Run `check(config)` where GenericTrainer.start() creates its model loader: the
    config is final, and the model is loaded right after. Idempotent."""
    create = base_trainer_class.create_model_loader
    if getattr(create, "_adt_checked", False):
        return

    @functools.wraps(create)
    def create_model_loader(self):
        check(self.config)
        return create(self)

    create_model_loader._adt_checked = True
    base_trainer_class.create_model_loader = create_model_loader


def extend_train_window(base_view_class: type, extend: Callable[[Any], None]) -> None:
    """Call `extend(view)` on every train window just before it builds its tabs.

    The GUI imports the plugin (through modules.util.create) while its window module is
    still being imported, so the window class does not exist yet; BaseTrainUIView does,
    and the window calls its __init__ first. Idempotent."""
    init = base_view_class.__init__
    if getattr(init, "_adt_extended", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        extend(self)

    __init__._adt_extended = True
    base_view_class.__init__ = __init__


def name_loaded_files(top_bar_controller_class: type, loading_from: Callable[[str], Any]) -> None:
    """Errors raised while the GUI reads a preset or config name that file. Idempotent."""
    load = top_bar_controller_class.load_config_from_file
    if getattr(load, "_adt_named", False):
        return

    @functools.wraps(load)
    def load_config_from_file(self, filename, *args, **kwargs):
        with loading_from(str(filename)):
            return load(self, filename, *args, **kwargs)

    load_config_from_file._adt_named = True
    top_bar_controller_class.load_config_from_file = load_config_from_file


def one_line_settings_errors() -> None:
    """A bad ADT setting or a missing model it names that reaches the top of scripts/train.py is one line on stderr
    (exit code 1), not a traceback through OneTrainer's config reader. Other errors keep
    the hook that was there. Idempotent."""
    if getattr(sys.excepthook, "_adt_hook", False):
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, (SettingsError, ModelNotFound)):
            print(f"adt-plugin: {value}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    hook._adt_hook = True
    sys.excepthook = hook


__all__ = [
    "UPSTREAM", "check_at_start", "extend_train_window", "name_loaded_files", "one_line_settings_errors",
    "patch_train_config", "replace_registered",
]
