"""The `--adt_*` options, generated from `AdtSettings`.

Every field of `AdtSettings` becomes `--adt_<field>` (and the TOML key
`adt_<field>` in a `--config_file`), so a setting added to the core shows up
here without an edit. Options left out keep the model family's default (see
`families.py`), then the core's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Any, Mapping

from ..settings import AdtSettings, SettingsError

PREFIX = "adt_"


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _option(field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    kwargs: dict[str, Any] = {"default": None, "dest": PREFIX + field.name}
    help_text = field.metadata.get("help", f"ADT setting `{field.name}`")
    if hint is bool:
        kwargs.update(type=parse_bool, nargs="?", const=True, metavar="true|false")
    elif hint is int or hint is float:
        kwargs.update(type=hint)
    elif typing.get_origin(hint) is tuple:
        kwargs.update(type=int, nargs="+", metavar="N")
    else:
        kwargs.update(type=str)
    kwargs["help"] = f"{help_text} (default: {shown})"
    return kwargs


def add_adt_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group(
        "ADT (adt-plugin)",
        "Adversarial Diffusion Tuning. Each option is also a TOML key of the same name in --config_file.",
    )
    hints = typing.get_type_hints(AdtSettings)
    for field in dataclasses.fields(AdtSettings):
        group.add_argument(f"--{PREFIX}{field.name}", **_option(field, hints[field.name]))
    return group


def settings_from_args(args: argparse.Namespace, defaults: Mapping[str, Any] = (), source: str = "command line / config file") -> AdtSettings:
    """AdtSettings from the parsed `adt_*` values; a misspelt `adt_*` TOML key (which
    sd-scripts' config reader would silently keep) is an error naming the closest key."""
    known = [PREFIX + f.name for f in dataclasses.fields(AdtSettings)]
    for key in vars(args):
        if key.startswith(PREFIX) and key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; ADT options: {', '.join(known)}"
            raise SettingsError(f"{source}: unknown ADT option {key!r}{hint}")
    values = dict(defaults)
    for key in known:
        value = getattr(args, key, None)
        if value is not None:
            values[key[len(PREFIX) :]] = value
    return AdtSettings.from_mapping(values, source=source)


__all__ = ["PREFIX", "add_adt_arguments", "parse_bool", "settings_from_args"]
