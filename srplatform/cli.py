"""The `c2d` command line.

Each subcommand lives in `srplatform/commands/<name>.py` and defines:
    HELP: str                      one line for `c2d --help`
    DESCRIPTION: str               the longer text for `c2d <name> --help`
    configure(parser) -> None      adds its arguments (or sub-subcommands)
    run(args) -> int               does the work, returns the exit code
Command modules import heavy libraries (ray, mlflow, torch) inside `run`, so `c2d --help`
stays fast and a broken optional dependency only breaks the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from srplatform.errors import UserError

# Order is the order shown in `c2d --help`.
COMMANDS = [
    "stack",
    "data",
    "pretrain",
    "finetune",
    "pipeline",
    "tune",
    "eval",
    "promote",
    "upscale",
    "serve",
    "submit",
    "jobs",
    "model",
    "demo",
]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Raw descriptions; "(default: X)" appended where it says something: not when the help
    already names its default, nor for flags, empty values and None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or isinstance(default, bool)
                or (isinstance(default, (str, list, tuple)) and not default)):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="c2d",
        description=(
            "c2disr: train attention-based super-resolution models the C2D-ISR way on Ray\n"
            "(continuous-scale pretraining, then discrete x2/x3/x4 fine-tuning), track them in\n"
            "MLflow, search hyperparameters with Ray Tune and promote models in the registry.\n\n"
            "Run `c2d <command> --help` for the details of each command."
        ),
        formatter_class=_Formatter,
    )
    from srplatform import __version__

    parser.add_argument("--version", action="version", version=f"c2d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMANDS:
        mod = importlib.import_module(f"srplatform.commands.{name}")
        p = sub.add_parser(
            name, help=mod.HELP, description=mod.DESCRIPTION, formatter_class=_Formatter
        )
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a reader that went away shows here, not in Python's exit flush
    except BrokenPipeError:
        # `c2d ... | head`: the reader has what it wanted. Stop quietly, as `ls | head` does;
        # stdout goes to /dev/null so that the exit flush of what is left cannot fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a command its pipe cut off


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as exc:  # an error the user can fix: no traceback
        print(f"c2d {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
