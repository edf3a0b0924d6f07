"""The bundled presets: package data, read where the package is installed.

    NAME.toml                the `adt train` presets (`adt presets` lists them)
    families/paper.toml      what every family shares: the paper's settings (Sec. 5)
    families/<family>.toml   one model family's own settings (sampler, CFG, learning rates,
                             resolution); each `extends = "families/paper"`, and a preset
                             `extends = "families/<family>"` (or another preset)
    kohya_gui/*.json         kohya_ss GUI presets      } generated from the TOML presets by
    onetrainer/<dir>/*.json  OneTrainer presets        } `python -m adt_plugin.presets.generate`

The family files are the single source of each family's settings: the TOML presets
extend them, the GUI presets are generated from those, and the sd-scripts plugin takes
its per-family defaults from them (`family_adt_defaults`).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

FAMILY_FOLDER = "families"


def folder() -> Path:
    """The folder the presets were installed to (a checkout's adt_plugin/presets, or site-packages')."""
    return Path(str(resources.files(__name__)))


def read_toml(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads(text)
    import toml

    return toml.loads(text)


def family_file(family: str) -> Path:
    """families/<family>.toml; `family` as `adt train` names it (sd1, sdxl, sd3)."""
    path = folder() / FAMILY_FOLDER / f"{family}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in (folder() / FAMILY_FOLDER).glob("*.toml") if p.stem != "paper")
        raise KeyError(f"no preset family {family!r} in {path.parent} (known: {', '.join(known)})")
    return path


def family_adt_defaults(family: str) -> dict[str, Any]:
    """The [adt] settings that one family's file states (what differs between families:
    sampler, steps, guidance scale, discriminator learning rate), without what every
    family shares (families/paper.toml) and without the core's defaults."""
    values = dict(read_toml(family_file(family)).get("adt", {}))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


__all__ = ["FAMILY_FOLDER", "family_adt_defaults", "family_file", "folder", "read_toml"]
