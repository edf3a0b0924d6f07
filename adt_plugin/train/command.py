"""`adt train`: fine-tune SD1.x/2.x, SDXL or SD3 (LoRA or full) with ft, adt, ... from a TOML file.

    adt train --config run.toml [--preset NAME] [--strategy adt] [section.key=value ...]
    adt train --config run.toml --resume outputs/NAME-step00001000-state
    adt train --config run.toml --check        # validate the config, folders, data and backbone; load no model

Options and `section.key=value` overrides may come in any order.
Exit codes: 0 done, 1 stopped by an unexpected error (model and state saved first),
2 bad config / data / model / state, 3 stopped on non-finite values,
130 interrupted (a resumable state was saved).
"""

from __future__ import annotations

import sys

HELP = "fine-tune SD1.x/2.x, SDXL or SD3 (LoRA or full) with ft, adt, ... from a TOML config"
EXIT_CODES = {"done": 0, "nonfinite": 3, "interrupted": 130}
EXIT_ABORTED = 1
# The `adt` parser reads this command's options and key=value overrides intermixed
# (argparse's parse_intermixed_args), so an override may follow an option.
INTERMIXED = True


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
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config, the output folders, the data, the model's family (and --resume's state) and "
        "find the backbone (downloading it once if needed), then stop",
    )
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
    from .data import DataError
    from .loading import ModelLoadError
    from .lora import LoraSetupError
    from .state import ResumeError

    try:
        config = load_run_config(args.config, args.preset, [*_flag_overrides(args), *args.overrides])
        if args.check:  # everything that needs no weights: what `adt train` checks before loading
            from ..strategies import preflight
            from .setup import check_run

            checked = check_run(config, args.resume)
            for line in checked.report.lines():
                print(line)
            for line in preflight(config.adt, prefix="[adt] "):  # the backbone (and taps against its depth), no weights
                print(line)
            print(
                f"config OK: {config.model.path} ({checked.family.name}), {config.train.method}, strategy "
                f"{config.adt.strategy}, {config.train.max_steps} steps, writing to {config.output_dir}"
                + (f", resuming {args.resume} at step {checked.saved['step']}" if checked.saved else "")
                + f"; sources: {', '.join(config.sources)}"
            )
            return 0
        from .loop import RunAborted, train

        try:
            result = train(config, args.resume)
        except RunAborted as err:
            import traceback

            traceback.print_exception(err.__cause__, file=sys.stderr)  # the cause, for a bug report
            print(f"adt train: {err}", file=sys.stderr)
            return EXIT_ABORTED
    except (SettingsError, DataError, ModelLoadError, LoraSetupError, ResumeError, FileNotFoundError) as err:
        print(f"adt train: error: {err}", file=sys.stderr)
        return 2
    return EXIT_CODES[result.status]
