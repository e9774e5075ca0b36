"""``nearid-train``: train the NearID head (:func:`nearid_metric.train.loop.train`) from a config file and flags.

Also runs as ``torchrun --nproc-per-node N -m nearid_metric.train CONFIG``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from nearid_metric.cli.common import EXIT_OK, command_parser, logger, run_command
from nearid_metric.train.config import (
    FIELD_HELP,
    TrainConfig,
    check_config,
    read_config_file,
)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "nearid-train",
        "Train the NearID identity head on a frozen SigLIP2 trunk and export a checkpoint folder that "
        "NearIDScore loads. Settings: defaults (the reference trainer's recipe) < CONFIG file < flags.",
    )
    parser.add_argument("config", nargs="?", type=Path, help="TOML or YAML file of settings (names as the flags)")
    for f in dataclasses.fields(TrainConfig):
        default = getattr(TrainConfig(), f.name)
        flag = "--" + f.name.replace("_", "-")
        common = dict(default=argparse.SUPPRESS, help=with_default(FIELD_HELP[f.name], default))
        if isinstance(default, bool):  # --flag / --no-flag
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="+", metavar=f.name.upper(), **common)
        elif isinstance(default, float):
            parser.add_argument(flag, type=float, **common)
        elif "int" in f.type:
            parser.add_argument(flag, type=int, **common)
        else:
            parser.add_argument(flag, **common)
    return parser


def with_default(text: str, default: object) -> str:
    """A flag's help with its default appended, unless the text already states it."""
    if "default" in text:
        return text
    shown = {True: "on", False: "off", None: "none"}.get(default, default) if not isinstance(default, list) else (
        " ".join(default) or "none")
    return f"{text} (default: {shown})".replace("%", "%%")


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Defaults, then the config file, then the flags; ``SystemExit(2)`` with a message for bad settings."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    path = args.pop("config")
    try:
        values = read_config_file(path) if path else {}
        values.update(args)
        config = TrainConfig(**values)
        check_config(config)
    except ValueError as e:
        parser.error(str(e))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """``nearid-train``: 0 when the run finished or stopped at ``--max-steps``, 2 for bad settings or data."""
    config = config_from_args(argv)

    def command() -> int:
        from nearid_metric.train.loop import train

        summary = train(config)
        if not summary["finished"]:
            logger.info("stopped at step %d; run again with --resume to continue", summary["steps"])
        return EXIT_OK

    return run_command("nearid-train", command)


if __name__ == "__main__":
    sys.exit(main())
