"""`adt doctor`: the environment a training run will see, and the core's self-check.

One line per check: `[ ok ]`, `[warn]` (works, but worth knowing) or `[FAIL]`.
Exits non-zero if any check fails.
"""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Callable

from packaging.version import InvalidVersion, Version

from . import hub
from .backbones import DEFAULT_DINOV2, locate_dinov2

HELP = "report the environment a training run will see and run the core's self-check"

# The oldest versions we support: what kohya-ss sd-scripts pins.
MINIMUM = {"torch": "2.4", "diffusers": "0.32.1", "transformers": "4.54.1", "accelerate": "1.6.0", "peft": "0.13", "safetensors": "0.4.5"}


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - a broken install is reported, not raised
        return None


def environment_checks(backbone_path: str) -> list[tuple[str, str, str]]:
    import torch

    rows: list[tuple[str, str, str]] = [("ok", "python", f"{platform.python_version()} ({sys.executable})")]
    for name, minimum in MINIMUM.items():
        found = _version(name)
        if found is None:
            rows.append(("FAIL", name, f"not importable (need >= {minimum})"))
            continue
        try:
            ok = Version(found.split("+")[0]) >= Version(minimum)
        except InvalidVersion:
            ok = True
        rows.append(("ok" if ok else "FAIL", name, found if ok else f"{found} is older than the supported {minimum}"))
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        rows.append(("ok", "device", f"CUDA {torch.version.cuda}: {names}; bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        rows.append(("warn", "device", "no CUDA device: training runs on the CPU (fine for the demo and tests, slow for SD)"))
    sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    xformers = _version("xformers")
    attention = "SDPA" + (f"; xformers {xformers} installed (optional)" if xformers else "; xformers not installed (optional)")
    rows.append(("ok" if sdpa else "FAIL", "attention", attention))
    rows.extend(backbone_checks(backbone_path))
    return rows


def backbone_checks(backbone_path: str) -> list[tuple[str, str, str]]:
    """Where the backbone would come from (folder, cache, or a download on first use) and
    whether the Hugging Face Hub answers (one HEAD request; nothing is downloaded)."""
    state, detail = hub.hub_status()
    rows = [("warn" if state == "unreachable" else "ok", "Hugging Face Hub", f"{state}: {detail}")]
    try:
        source = locate_dinov2(backbone_path)
    except hub.ModelNotFound as err:
        return rows + [("warn", "DINOv2 backbone", f"not found: {err}. ADT on SD models needs it; `adt demo` does not")]
    if source.kind == hub.DOWNLOAD and state != "reachable":
        return rows + [("warn", "DINOv2 backbone", f"{source.describe()}, but the Hub is {state}")]
    return rows + [("ok", "DINOv2 backbone", source.describe())]


def run_doctor(backbone_path: str = DEFAULT_DINOV2, selfcheck: bool = True, echo: Callable[[str], None] = print) -> int:
    failed = 0
    for status, name, detail in environment_checks(backbone_path):
        failed += status == "FAIL"
        echo(f"[{status:^4}] {name}: {detail}")
    if selfcheck:
        from .selfcheck import run_selfcheck

        def report(result):
            nonlocal failed
            failed += not result.ok
            echo(f"[{'ok' if result.ok else 'FAIL':^4}] self-check {result.name}: {result.detail}")

        run_selfcheck(report=report)
    echo("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


def add_arguments(parser) -> None:
    parser.add_argument("--backbone", default=DEFAULT_DINOV2, help=f"DINOv2 folder or Hugging Face hub id to look for (default {DEFAULT_DINOV2})")
    parser.add_argument("--no-selfcheck", action="store_true", help="only report the environment")


def run(args) -> int:
    return run_doctor(args.backbone, selfcheck=not args.no_selfcheck)
