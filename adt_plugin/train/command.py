"""`adt train`: fine-tune SD1.x/2.x, SDXL or SD3 (LoRA or full) with ft, adt, ... from a TOML file.

    adt train --config run.toml [--preset NAME] [--strategy adt] [section.key=value ...]
    adt train --config run.toml --resume outputs/NAME-step00001000-state
    adt train --config run.toml --check        # validate the config, the data and the backbone, load no model

Exit codes: 0 done, 2 bad config / data / model, 3 stopped on non-finite losses,
130 interrupted (a resumable state was saved).
"""

from __future__ import annotations

import sys

HELP = "fine-tune SD1.x/2.x, SDXL or SD3 (LoRA or full) with ft, adt, ... from a TOML config"
EXIT_CODES = {"done": 0, "nonfinite": 3, "interrupted": 130}


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="the run's TOML file")
    parser.add_argument("--preset", help="a preset name (`adt presets`) or TOML file; the config's values win")
    parser.add_argument("--strategy", help="loss strategy: ft, adt, ... (adt.strategy)")
    parser.add_argument("--resume", metavar="DIR", help="a NAME-stepNNNNNNNN-state folder to continue from")
    parser.add_argument(
        "--save_every_n_steps", type=int, metavar="N", help="save model, discriminator and state every N steps"
    )
    parser.add_argument(
        "--keep_last_n", type=int, metavar="N", help="keep only the newest N step saves (save.keep_last)"
    )
    parser.add_argument("--max_steps", type=int, metavar="N", help="train.max_steps")
    parser.add_argument("--output_dir", help="train.output_dir")
    parser.add_argument("--check", action="store_true", help="validate the config, scan the data, find the backbone (downloading it once if needed), then stop")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="e.g. train.learning_rate=1e-5 adt.g_every=5"
    )


FLAGS = (
    ("strategy", "adt", "strategy"),
    ("save_every_n_steps", "save", "every_n_steps"),
    ("keep_last_n", "save", "keep_last"),
    ("max_steps", "train", "max_steps"),
    ("output_dir", "train", "output_dir"),
)


def _flag_overrides(args) -> list[tuple[str, str, object]]:
    """The shortcut flags as (section, key, value), applied after the config and before key=value overrides."""
    return [(section, key, getattr(args, flag)) for flag, section, key in FLAGS if getattr(args, flag) is not None]


def run(args) -> int:
    from ..settings import SettingsError
    from .config import load_run_config
    from .data import DataError, scan_folder
    from .loading import ModelLoadError
    from .lora import LoraSetupError
    from .state import ResumeError

    try:
        config = load_run_config(args.config, args.preset, [*_flag_overrides(args), *args.overrides])
        if args.check:  # everything that needs no model weights: config, packages, images, family, backbone
            from ..strategies import preflight
            from .loading import detect_family
            from .loop import check_environment, check_sampler_fits

            check_environment(config)
            report = scan_folder(config.data.folder, config.data.caption_extension, config.data.min_size)
            for line in report.lines():
                print(line)
            family = detect_family(config.model)
            check_sampler_fits(config, family)
            for line in preflight(config.adt, prefix="[adt] "):  # the backbone (and taps against its depth), no weights loaded
                print(line)
            print(
                f"config OK: {config.model.path} ({family}), {config.train.method}, strategy {config.adt.strategy}, "
                f"{config.train.max_steps} steps; sources: {', '.join(config.sources)}"
            )
            return 0
        from .loop import train

        result = train(config, args.resume)
    except (SettingsError, DataError, ModelLoadError, LoraSetupError, ResumeError, FileNotFoundError) as err:
        print(f"adt train: error: {err}", file=sys.stderr)
        return 2
    return EXIT_CODES[result.status]
