"""`adt presets`: the paper's settings as TOML files, one line each.

A preset is `NAME.toml` in the package's `adt_plugin/presets/` folder (package
data, so it ships with the wheel; or in the folder named by $ADT_PRESETS_DIR). It
holds a `description`, may `extends` another preset or a family file
(`families/sdxl`: see adt_plugin/presets/__init__.py; its values are the base, the
file's own win), and otherwise has the sections of a run config. `--preset` also
takes a path to a TOML file.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

HELP = "list the bundled presets (the paper's settings), one line each"


def presets_dir() -> Path:
    env = os.environ.get("ADT_PRESETS_DIR")
    if env:
        return Path(env)
    from .. import presets

    return presets.folder()


def available() -> dict[str, Path]:
    folder = presets_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def find_preset(name: str) -> Path:
    path = Path(os.path.expanduser(name))
    if path.suffix == ".toml" and path.is_file():
        return path
    known = available()
    if name in known:
        return known[name]
    if "/" in name:  # a layer such as families/sdxl: $ADT_PRESETS_DIR's, else the bundled one
        from .. import presets

        for folder in dict.fromkeys((presets_dir(), presets.folder())):
            if (folder / f"{name}.toml").is_file():
                return folder / f"{name}.toml"
    from .config import ConfigError

    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown preset {name!r}{hint} (`adt presets` lists them; presets live in {presets_dir()})")


def preset_layers(name: str) -> list[tuple[str, dict]]:
    """The preset and what it extends, base first, each layer checked."""
    from .config import ConfigError, check_layout, read_toml

    layers: list[tuple[str, dict]] = []
    seen: set[str] = set()
    while name:
        if name in seen:
            raise ConfigError(f"preset {name!r} extends itself (through {', '.join(seen)})")
        seen.add(name)
        path = find_preset(name)
        raw = read_toml(path)
        check_layout(raw, f"preset {path.name}")
        label = name if "/" in name and not name.endswith(".toml") else path.stem
        layers.append((label, {k: v for k, v in raw.items() if k not in ("extends", "description", "preset")}))
        name = raw.get("extends", "")
    return layers[::-1]


def describe(path: Path) -> str:
    from .config import read_toml

    return str(read_toml(path).get("description", "")).strip()


def add_arguments(parser) -> None:
    parser.add_argument(
        "--show", metavar="NAME", help="print one preset as TOML, merged with what it extends and the defaults"
    )


def run(args) -> int:
    if args.show:
        import toml

        from .config import build_run_config, merge

        merged: dict = {}
        for _, raw in preset_layers(args.show):
            merged = merge(merged, raw)
        config = build_run_config(merged, (f"preset {args.show}",))
        print(f"# preset {args.show}, merged with what it extends and the defaults")
        print(toml.dumps(config.to_dict()))
        return 0
    known = available()
    if not known:
        print(f"no presets found in {presets_dir()}")
        return 1
    width = max(len(n) for n in known)
    for name, path in known.items():
        print(f"{name:<{width}}  {describe(path)}")
    return 0
