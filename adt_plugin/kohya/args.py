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
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

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


def option_names() -> list[str]:
    return [f"--{PREFIX}{f.name}" for f in dataclasses.fields(AdtSettings)]


def read_adt_options(argv: Sequence[str], defaults: Mapping[str, Any] = ()) -> AdtSettings:
    """The ADT settings of an sd-scripts command line and the `--config_file` TOML it names,
    checked without sd-scripts (the launcher calls this before sd-scripts imports torch and
    loads anything): a misspelt `--adt_*` flag or `adt_*` TOML key names the closest valid
    one, a bad value names the option. The command line wins over the TOML, as in
    sd-scripts' `read_config_from_file`; then `defaults` (the model family's), then the core's."""
    known = option_names()
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--" + PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; ADT options: {', '.join(known)}"
            raise SettingsError(f"command line: unknown option {name}{hint}")
    config_file = _option_value(argv, "--config_file")
    toml_values: dict[str, Any] = {}
    source = "command line"
    if config_file:
        path = Path(config_file if config_file.endswith(".toml") else config_file + ".toml")  # as sd-scripts reads it
        if path.is_file():
            toml_values = {k: v for k, v in _flat_toml(path).items() if k.startswith(PREFIX)}
            source = f"{path} / command line"
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    add_adt_arguments(parser)
    try:
        args, _ = parser.parse_known_args(list(argv), namespace=argparse.Namespace(**toml_values))
    except argparse.ArgumentError as err:
        raise SettingsError(f"command line: {err}") from None
    return settings_from_args(args, defaults, source=source)


def _option_value(argv: Sequence[str], name: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _flat_toml(path: Path) -> dict[str, Any]:
    """The TOML's keys with its sections flattened, as sd-scripts' read_config_from_file does."""
    import toml  # sd-scripts' own TOML reader (pinned 0.10.2 there)

    try:
        data = toml.load(str(path))
    except (toml.TomlDecodeError, OSError) as err:
        raise SettingsError(f"{path}: cannot read it as TOML ({err})") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


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


__all__ = ["PREFIX", "add_adt_arguments", "option_names", "parse_bool", "read_adt_options", "settings_from_args"]
