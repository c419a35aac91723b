"""The `proctor` command line. Start-up stays light: heavy modules load inside the commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proctor",
        description="A terminal supervisor for LLM-guided experimentation.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train the experiment of CONFIG once and print its metrics",
        description="Run the trusted harness once on CONFIG in an isolated process and print "
        "the evaluator's metrics. The run's log and results go to log/train/<time>/.",
    )
    train.add_argument("config", type=Path, help="experiment config (YAML)")
    train.add_argument(
        "--runner",
        choices=["zygote", "subprocess"],
        default="subprocess",
        help="how to start the run (default: subprocess; zygote pays off over many runs)",
    )
    train.add_argument("--device", help="override training.device (cpu, cuda, cuda:1, auto)")
    train.add_argument("--quiet", action="store_true", help="do not echo the training log")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `proctor` console script."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from tui.commands import train

            return train(args.config, runner=args.runner, device=args.device, quiet=args.quiet)
    except UsageError as exc:
        print(f"proctor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("proctor: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
