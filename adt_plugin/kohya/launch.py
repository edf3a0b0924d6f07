"""Run one of sd-scripts' LoRA trainers with ADT.

    accelerate launch -m adt_plugin.kohya.launch /path/to/sd-scripts/sdxl_train_network.py \\
        --config_file my_lora.toml --adt_backbone_path ./dinov2-small

The first argument is the sd-scripts script you would have launched
(train_network.py for SD1.x/2.x, sdxl_train_network.py, sd3_train_network.py);
everything after it is that script's own options plus the `--adt_*` options.
sd-scripts' parser, `--config_file` TOML reading and trainer run unchanged; only
the per-batch loss is ADT's.

The kohya_ss GUI launches `accelerate launch <launch options> <sd-scripts script>
...`. With `-m adt_plugin.kohya.launch` in its "Extra accelerate launch
arguments" box, the GUI's remaining launch options (--mixed_precision,
--num_processes, ...) land after our module name, i.e. in our arguments: they
are read here and applied as accelerate would for one process.

ADT is on only when it is asked for: an `--adt_*` option on the command line (the
ADT presets put them in the GUI's "Additional parameters") or an `adt_*` key in the
`--config_file` TOML. Without one the script runs unchanged, as plain sd-scripts:
a stock GUI preset clears "Additional parameters" but leaves "Extra accelerate
launch arguments" as it was, so `-m adt_plugin.kohya.launch` can outlive the ADT
preset that put it there.
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .families import FAMILIES, Family, family_for_script

ENV_SD_SCRIPTS = "ADT_SD_SCRIPTS"

# `accelerate launch` options (value-taking or flags) that kohya_ss' GUI appends after its
# "Extra accelerate launch arguments" (kohya_gui/class_accelerate_launch.py, AccelerateLaunch.run_cmd)
ACCELERATE_VALUE_OPTIONS = (
    "--gpu_ids", "--main_process_port", "--mixed_precision", "--num_processes", "--num_machines",
    "--num_cpu_threads_per_process", "--dynamo_backend", "--dynamo_mode",
)
ACCELERATE_FLAG_OPTIONS = ("--multi_gpu", "--dynamo_use_fullgraph", "--dynamo_use_dynamic")


class LaunchError(SystemExit):
    """A launch problem, reported as one line (exit code 1)."""

    def __init__(self, message: str):
        super().__init__(f"adt_plugin.kohya: {message}")


def split_accelerate_options(argv: Sequence[str]) -> tuple[dict[str, Optional[str]], list[str]]:
    """Leading `accelerate launch` options (as the GUI places them) and the rest."""
    options: dict[str, Optional[str]] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ACCELERATE_VALUE_OPTIONS:
            if eq:
                options[name] = value
                i += 1
            else:
                if i + 1 >= len(argv):
                    raise LaunchError(f"{name} needs a value")
                options[name] = argv[i + 1]
                i += 2
        elif arg in ACCELERATE_FLAG_OPTIONS:
            options[arg] = None
            i += 1
        else:
            break
    return options, list(argv[i:])


def apply_accelerate_options(options: dict[str, Optional[str]]) -> None:
    """What `accelerate launch` would have done with these options for one process."""
    processes = int(options.get("--num_processes") or 1)
    if "--multi_gpu" in options or processes > 1 or int(options.get("--num_machines") or 1) > 1:
        raise LaunchError(
            "multi-GPU launch options came after `-m adt_plugin.kohya.launch`, where accelerate cannot see them. "
            "For several GPUs run from a terminal: accelerate launch --multi_gpu --num_processes N "
            "-m adt_plugin.kohya.launch <sd-scripts script> --config_file <toml> [--adt_* options]"
        )
    gpu_ids = options.get("--gpu_ids")
    if gpu_ids and gpu_ids != "all":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", gpu_ids)
    if options.get("--mixed_precision"):
        os.environ.setdefault("ACCELERATE_MIXED_PRECISION", str(options["--mixed_precision"]))
    if options.get("--num_cpu_threads_per_process"):
        os.environ.setdefault("OMP_NUM_THREADS", str(options["--num_cpu_threads_per_process"]))
    if options.get("--dynamo_backend") and options["--dynamo_backend"].lower() != "no":
        os.environ.setdefault("ACCELERATE_DYNAMO_BACKEND", str(options["--dynamo_backend"]).upper())


def pop_option(argv: list[str], name: str) -> Optional[str]:
    """Remove `--name VALUE` / `--name=VALUE` from argv; return VALUE."""
    for i, arg in enumerate(argv):
        if arg == name:
            if i + 1 >= len(argv):
                raise LaunchError(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def check_sd_scripts(root: Path, family: Family) -> Path:
    root = root.expanduser().resolve()
    if not (root / "library" / "train_util.py").is_file():
        raise LaunchError(
            f"{root} is not an sd-scripts checkout (no library/train_util.py); point --sd_scripts "
            f"(or ${ENV_SD_SCRIPTS}) at the folder that holds {family.script}, e.g. kohya_ss/sd-scripts"
        )
    if not (root / family.script).is_file():
        raise LaunchError(f"{root} has no {family.script}; this sd-scripts version cannot train {family.label} LoRAs")
    return root


def resolve(argv: list[str], family_name: Optional[str]) -> tuple[Family, Path, list[str]]:
    """(family, sd-scripts root, the script's own arguments)."""
    sd_scripts = pop_option(argv, "--sd_scripts")
    if argv and argv[0].endswith(".py"):
        script = Path(argv.pop(0))
        try:
            family = family_for_script(script.name)
        except ValueError as err:
            raise LaunchError(str(err)) from None
        if family_name and family.name != family_name:
            raise LaunchError(f"{script.name} trains {family.label}, but this entry point is for {FAMILIES[family_name].label}")
        return family, check_sd_scripts(Path(sd_scripts) if sd_scripts else script.parent, family), argv
    if family_name is None:
        raise LaunchError(
            "give the sd-scripts script first, e.g. `-m adt_plugin.kohya.launch /path/to/sd-scripts/train_network.py "
            "--config_file my.toml`, or use adt_plugin.kohya.train_network / sdxl_train_network / sd3_train_network "
            "with --sd_scripts PATH"
        )
    family = FAMILIES[family_name]
    root = sd_scripts or os.environ.get(ENV_SD_SCRIPTS)
    if not root:
        if (Path.cwd() / family.script).is_file():
            root = str(Path.cwd())
        else:
            raise LaunchError(f"where is sd-scripts? pass --sd_scripts PATH or set ${ENV_SD_SCRIPTS}")
    return family, check_sd_scripts(Path(root), family), argv


def check_before_loading(script_args: Sequence[str], family: Family):
    """Everything about ADT that can be checked before sd-scripts imports its modules and
    loads the model: the `--adt_*` options and `adt_*` TOML keys (names, types, values),
    and the models they name (the backbone, found or downloaded now; taps against its
    depth). A problem is one line (exit code 1). Returns the settings."""
    from ..settings import SettingsError
    from ..strategies import preflight
    from .args import read_adt_options

    try:
        settings = read_adt_options(script_args, family.defaults)
        for line in preflight(settings, echo=lambda line: print(f"ADT: {line}"), prefix="--adt_"):
            print(f"ADT: {line}")
    except (SettingsError, FileNotFoundError) as err:  # hub.ModelNotFound is a FileNotFoundError
        raise LaunchError(str(err)) from None
    return settings


def adt_requested(script_args: Sequence[str]) -> bool:
    """An `--adt_*` option, `--help`, or an `adt_*` key in the --config_file TOML (sd-scripts
    flattens its sections, so a key counts in any section)."""
    if any(arg.startswith("--adt_") or arg in ("-h", "--help") for arg in script_args):
        return True
    config = pop_option(list(script_args), "--config_file")
    if not config:
        return False
    path = Path(config if config.endswith(".toml") else config + ".toml")  # as sd-scripts' read_config_from_file
    try:
        import toml

        data = toml.loads(path.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - missing or broken: sd-scripts itself reports it
        return False
    keys = [k for name, v in data.items() for k in (v if isinstance(v, dict) else {name: v})]
    return any(key.startswith("adt_") for key in keys)


def run_unchanged(argv: list[str], family_name: Optional[str]) -> int:
    """The sd-scripts script as `accelerate launch <script> ...` would run it, without ADT."""
    if argv and argv[0].endswith(".py"):
        pop_option(argv, "--sd_scripts")  # ours, not the script's
    else:
        fam, root, rest = resolve(argv, family_name)
        argv = [str(root / fam.script), *rest]
    script = Path(argv[0]).expanduser().resolve()
    if not script.is_file():
        raise LaunchError(f"{argv[0]}: no such sd-scripts script")
    print(f"adt_plugin.kohya: ADT is off (no --adt_* option, no adt_* key in --config_file); "
          f"running {script.name} unchanged", flush=True)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser(script_module) -> argparse.ArgumentParser:
    from .args import add_adt_arguments

    parser = script_module.setup_parser()
    add_adt_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None, family: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options, argv = split_accelerate_options(argv)
    apply_accelerate_options(options)
    if not adt_requested(argv):
        return run_unchanged(argv, family)
    fam, root, script_args = resolve(argv, family)
    if not {"-h", "--help"} & set(script_args):  # help needs no settings and no backbone
        check_before_loading(script_args, fam)

    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    script_module = importlib.import_module(fam.module)
    from library import train_util  # sd-scripts' own

    from ..checkpoint import CheckpointMismatch
    from ..settings import SettingsError
    from .trainer import make_trainer_class

    parser = build_parser(script_module)
    parser.prog = f"adt_plugin.kohya.launch {fam.script}"
    # as if sd-scripts' script had been run: read_config_from_file parses sys.argv again
    sys.argv = [str(root / fam.script), *script_args]
    args = parser.parse_args(script_args)
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    # ADT skips the optimizer step on discriminator-only iterations by design; torch
    # would warn about the LR scheduler stepping without it on the first of them.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
    trainer_class = make_trainer_class(getattr(script_module, fam.trainer_class), fam)
    try:
        trainer_class().train(args)
    except (SettingsError, CheckpointMismatch) as err:  # bad settings or files: one clear line, no traceback
        raise LaunchError(str(err)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
