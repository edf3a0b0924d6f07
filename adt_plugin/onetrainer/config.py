"""The `adt` section of OneTrainer's TrainConfig, generated from `AdtSettings`.

`enabled` plus one entry per `AdtSettings` field, in OneTrainer's (name, default,
type, nullable) form, so a field added to the core appears in saved configs and
presets without an edit here. Patching `TrainConfig.default_values` (the only
place OneTrainer builds configs from) keeps the section through every
load / save / preset round trip.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from ..settings import AdtSettings

SECTION = "adt"


def section_fields() -> list[tuple[str, Any, type, bool]]:
    """(name, default, type, nullable) for BaseConfig; tuples become lists (JSON has no tuples)."""
    hints = typing.get_type_hints(AdtSettings)
    data: list[tuple[str, Any, type, bool]] = [("enabled", False, bool, False)]
    for field in dataclasses.fields(AdtSettings):
        hint = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        if typing.get_origin(hint) is tuple:
            data.append((field.name, list(default), list, False))
        else:
            data.append((field.name, default, hint, False))
    return data


def make_section_class(base_config: type) -> type:
    """OneTrainer's BaseConfig subclass for the section (built against the running OneTrainer)."""

    def default_values():
        return section_class(section_fields())

    def from_dict(self, data, migrate=True):
        # OneTrainer drops unknown keys silently; a misspelt ADT key should not go unnoticed
        for key in data:
            if key not in self.types and not key.startswith("__"):
                close = difflib.get_close_matches(key, list(self.types), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                print(f"{SECTION}: unknown key {key!r} ignored{hint}")
        return base_config.from_dict(self, data, migrate=migrate)

    section_class = type(
        "AdtConfig", (base_config,), {"default_values": staticmethod(default_values), "from_dict": from_dict}
    )
    return section_class


def add_section(config: Any, section_class: type) -> Any:
    """Give a TrainConfig instance the `adt` section (idempotent)."""
    if SECTION not in config.types:
        section = section_class.default_values()
        config.types[SECTION] = section_class
        config.nullables[SECTION] = False
        config.default_values[SECTION] = section
        setattr(config, SECTION, section)
    return config


def patch_train_config(train_config_class: type, base_config: type) -> type:
    """Make every `TrainConfig.default_values()` carry the section; returns the section class."""
    existing = getattr(train_config_class, "_adt_section_class", None)
    if existing is not None:
        return existing
    section_class = make_section_class(base_config)
    original = train_config_class.default_values

    def default_values():
        return add_section(original(), section_class)

    train_config_class.default_values = staticmethod(default_values)
    train_config_class._adt_section_class = section_class
    return section_class


def settings_from_section(section: Any) -> AdtSettings:
    """AdtSettings from the section (the presets carry each model family's values)."""
    values = {field.name: getattr(section, field.name) for field in dataclasses.fields(AdtSettings)}
    return AdtSettings.from_mapping(values, source="OneTrainer config [adt]")


__all__ = ["SECTION", "add_section", "make_section_class", "patch_train_config", "section_fields", "settings_from_section"]
