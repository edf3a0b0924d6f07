"""The `adt` section of OneTrainer's TrainConfig, generated from `AdtSettings`.

`enabled` plus one entry per `AdtSettings` field, in OneTrainer's (name, default,
type, nullable) form, so a field added to the core appears in saved configs and
presets without an edit here.

OneTrainer drops unknown keys and keeps the default for a value it cannot convert
(printing "Could not set ..."). For the `adt` section both are errors instead,
raised while the config is read, before anything is trained: an unknown key names
the closest valid one, a value of the wrong type names the key and the type it
needs, and both name the file they came from where that is known (see
`source_of`). Values that are the right type but out of range (`g_every = 0`, an
unknown sampler) are checked with everything else in `setup.check_before_loading`,
because a preset and a config file are applied one after the other and only the
result has to be consistent.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from ..settings import AdtSettings, SettingsError, coerce_fields

SECTION = "adt"
ENABLED = "enabled"

#: where the section being read comes from, when a caller knows (the GUI's preset loader)
_loading_from: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("adt_loading_from", default=None)


def section_fields() -> list[tuple[str, Any, type, bool]]:
    """(name, default, type, nullable) for BaseConfig; tuples become lists (JSON has no tuples)."""
    hints = typing.get_type_hints(AdtSettings)
    data: list[tuple[str, Any, type, bool]] = [(ENABLED, False, bool, False)]
    for field in dataclasses.fields(AdtSettings):
        hint = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        if typing.get_origin(hint) is tuple:
            data.append((field.name, list(default), list, False))
        else:
            data.append((field.name, default, hint, False))
    return data


# -- reading the section ---------------------------------------------------------------------
@contextlib.contextmanager
def loading_from(source: str) -> Iterator[None]:
    """Name the file a config is being read from, for the errors raised meanwhile."""
    token = _loading_from.set(source)
    try:
        yield
    finally:
        _loading_from.reset(token)


def source_of(section: Mapping[str, Any]) -> str:
    """Where `section` was read from: the file a caller named with `loading_from`, else the
    file given to OneTrainer's scripts/train.py (`--preset-path` / `--config-path`) whose
    `adt` section it is, else just "OneTrainer config"."""
    named = _loading_from.get()
    if named:
        return named
    for value in _flag_values(sys.argv, "--config-value"):  # scripts/train.py --config-value adt.<key>=<value>
        key, _, text = value.partition("=")
        if dict(section) == {key.removeprefix(f"{SECTION}."): text}:
            return f"--config-value {value}"
    for flag, kind in (("--config-path", "config"), ("--preset-path", "preset")):
        path = _flag_value(sys.argv, flag)
        if path is None:
            continue
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get(SECTION) == dict(section):
            return f"{kind} {path}"
    return "OneTrainer config"


def _flag_value(argv: list[str], flag: str) -> Optional[str]:
    values = _flag_values(argv, flag)
    return values[-1] if values else None


def _flag_values(argv: list[str], flag: str) -> list[str]:
    values = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def check_section_data(data: Any, source: Optional[str] = None) -> dict[str, Any]:
    """The section's entries checked and converted to their types (`enabled` included).

    Unknown keys and values of the wrong type are `SettingsError`s naming the key, the
    source and the closest valid key. Like OneTrainer's own fields, a number may come as
    a string (`--config-value adt.g_every=3` hands over "3"), and `taps` as "2,5,8,11"."""
    if not isinstance(data, Mapping):
        where = source or "OneTrainer config"
        raise SettingsError(f"{where}: [{SECTION}] must be a section of settings (a JSON object), got {data!r}")
    where = f"{source or source_of(data)}: [{SECTION}]"
    values = {key: value for key, value in data.items() if not str(key).startswith("__")}  # BaseConfig's "__version"
    out: dict[str, Any] = {}
    if ENABLED in values:
        enabled = values.pop(ENABLED)
        if not isinstance(enabled, bool):
            raise SettingsError(f"{where}: key {ENABLED!r} must be true or false, got {enabled!r}")
        out[ENABLED] = enabled
    hints = typing.get_type_hints(AdtSettings)
    known = [ENABLED] + [f.name for f in dataclasses.fields(AdtSettings)]
    for key in values:
        if key not in hints:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
            raise SettingsError(f"{where}: unknown key {key!r}{hint}")
    typed = {key: value_from_text(value, hints[key]) for key, value in values.items()}
    out.update(coerce_fields(AdtSettings, typed, where))
    return {key: list(value) if isinstance(value, tuple) else value for key, value in out.items()}


def value_from_text(value: Any, hint: Any) -> Any:
    """A string where OneTrainer would accept one for a number or a list of numbers."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if typing.get_origin(hint) is tuple:
            items = text.strip("[]").replace(",", " ").split()
            return [int(item) for item in items]
    except ValueError:
        return value  # coerce_fields names the key and the type it needs
    return value


def settings_from_section(section: Any) -> AdtSettings:
    """AdtSettings from the section (the presets carry each model family's values)."""
    values = {field.name: getattr(section, field.name) for field in dataclasses.fields(AdtSettings)}
    return AdtSettings.from_mapping(values, source=f"OneTrainer config [{SECTION}]")


# -- the section class, built against the running OneTrainer -------------------------------------
def make_section_class(base_config: type) -> type:
    """OneTrainer's BaseConfig subclass for the section."""

    def default_values():
        return section_class(section_fields())

    def from_dict(self, data, migrate=True):
        # raises before anything is set: a half-applied section is never left behind
        checked = check_section_data(data)
        return base_config.from_dict(self, checked, migrate=migrate)

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


def check_train_config_data(data: Any) -> None:
    """What OneTrainer's TrainConfig.from_dict is about to read: its `adt` section, checked
    here because BaseConfig.from_dict turns an error inside a section into a printed
    "Could not set adt as ..." and goes on."""
    if isinstance(data, Mapping) and SECTION in data:
        check_section_data(data[SECTION])


__all__ = [
    "ENABLED", "SECTION", "add_section", "check_section_data", "check_train_config_data", "loading_from",
    "make_section_class", "section_fields", "settings_from_section", "source_of", "value_from_text",
]
