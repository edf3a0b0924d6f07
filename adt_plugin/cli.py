"""The `adt` command.

Each sub-command is a module with `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`; adding a command is one line in `COMMANDS`. Modules keep
heavy imports inside `run`, so `adt --help` stays fast. A module with
`INTERMIXED = True` has its positionals and options parsed intermixed
(`adt train --config a.toml train.max_steps=5 --check adt.g_every=3`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "doctor": "adt_plugin.doctor",
    "eval": "adt_plugin.eval.command",
    "train": "adt_plugin.train.command",
    "presets": "adt_plugin.train.presets",
    "bench": "adt_plugin.train.bench",
    "demo": "adt_plugin.demo.cli",
}


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser; `intermixed = True` parses it with argparse's
    parse_known_intermixed_args (positionals may sit between options)."""

    intermixed = False
    _mixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self.intermixed and not self._mixing:
            self._mixing = True  # parse_known_intermixed_args calls back into parse_known_args
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._mixing = False
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="adt", description="Adversarial Diffusion Tuning for the trainers you already use")
    parser.add_argument("--version", action="version", version=f"adt-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        command.intermixed = getattr(module, "INTERMIXED", False)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
