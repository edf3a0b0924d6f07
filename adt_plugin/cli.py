"""The `adt` command. Each sub-command registers itself here and imports its
heavy modules only when it runs."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor(args.backbone, selfcheck=not args.no_selfcheck)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .backbones import DEFAULT_DINOV2

    parser = argparse.ArgumentParser(prog="adt", description="Adversarial Diffusion Tuning for the trainers you already use")
    parser.add_argument("--version", action="version", version=f"adt-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="report the environment and run the core's self-check")
    doctor.add_argument("--backbone", default=DEFAULT_DINOV2, help="DINOv2 folder or HF cache name to look for")
    doctor.add_argument("--no-selfcheck", action="store_true", help="only report the environment")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
