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

    run = commands.add_parser(
        "run",
        help="start an exploration run on CONFIG",
        description="Start an exploration run: the agent proposes, proctor runs and records, "
        "under log/<name>/. On a terminal the TUI opens with the engine inside it; --headless "
        "prints progress lines instead (also when the output is not a terminal); --detach "
        "starts the engine in the background, where it survives logging out (see attach).",
    )
    run.add_argument("config", type=Path, help="experiment config (YAML)")
    run.add_argument("--iterations", type=_positive_int, help="iterations to run in total")
    run.add_argument("--headless", action="store_true", help="no TUI: plain progress lines")
    run.add_argument("--detach", action="store_true",
                     help="run in the background (survives logout); prints how to attach")
    run.add_argument("--agent", choices=["heuristic", "anthropic"],
                     help="who proposes (default: anthropic with a key, else heuristic)")
    run.add_argument("--approve", choices=["auto", "code", "all"],
                     help="what waits for a human: nothing, code edits, everything")
    run.add_argument("--name", help="run name (default: <config>_<date-time>)")
    run.add_argument("--runner", choices=["zygote", "subprocess"], help="how runs start")
    run.add_argument("--log", action="store_true", help="echo the training logs")

    attach = commands.add_parser(
        "attach", help="open the TUI on a run that runs in the background",
        description="Watch and review a run started with --detach (or by another terminal). "
        "Decisions go to the run's journal; quitting leaves the run going. Any number of "
        "viewers may attach at once.")
    attach.add_argument("run", help="run name (a folder of log/)")

    resume = commands.add_parser("resume", help="continue a run after a stop or a crash")
    resume.add_argument("run", help="run name (a folder of log/)")
    resume.add_argument("--iterations", type=_positive_int, help="raise the iteration count")
    resume.add_argument("--log", action="store_true", help="echo the training logs")

    status = commands.add_parser("status", help="print a run's node table")
    status.add_argument("run", help="run name (a folder of log/)")
    status.add_argument("--json", action="store_true", help="machine-readable rows")

    approve = commands.add_parser("approve", help="approve the proposal a run is waiting on")
    approve.add_argument("run", help="run name (a folder of log/)")
    reject = commands.add_parser("reject", help="reject the proposal a run is waiting on")
    reject.add_argument("run", help="run name (a folder of log/)")
    reject.add_argument("--reason", required=True, help="why (the agent reads it)")
    stop = commands.add_parser("stop", help="stop a run cleanly (it can be resumed)")
    stop.add_argument("run", help="run name (a folder of log/)")
    revert = commands.add_parser(
        "revert", help="add a node that undoes NODE's change",
        description="Add a node whose code and config are NODE's parent's, as a child of "
        "NODE (a new commit; history is never rewritten). A live run applies it at its next "
        "iteration; a stopped run when it is resumed.")
    revert.add_argument("run", help="run name (a folder of log/)")
    revert.add_argument("node", type=_positive_int, help="the node to revert")
    commands.add_parser(
        "doctor", help="check the sandbox that every run gets on this machine",
        description="Run one real sandboxed child, as runs are made for this user, and print "
        "each layer of the sandbox: active, or missing and why. Exit code 1 when a layer is "
        "missing.")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _doctor() -> int:
    """Print the sandbox layers runs get here; 1 when any is missing."""
    import os

    from engine.runner import sandbox

    uid = os.geteuid()
    who = (f"root (untrusted runs become uid {sandbox.SANDBOX_UID})" if uid == 0
           else f"uid {uid}, a normal user")
    print(f"proctor doctor: the sandbox of every run, as proctor runs now: {who}")
    layers = sandbox.probe()
    for layer in layers:
        print(f"  {'active ' if layer.active else 'MISSING'}  {layer.name:<18} {layer.detail}")
    missing = [layer.name for layer in layers if not layer.active]
    if missing:
        print(f"{len(missing)} of {len(layers)} layers missing: runs here are less isolated "
              f"({', '.join(missing)})")
        return 1
    print(f"all {len(layers)} layers active")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `proctor` console script."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from tui.commands import train

            return train(args.config, runner=args.runner, device=args.device, quiet=args.quiet)
        if args.command == "run":
            from tui.commands import run

            return run(args.config, iterations=args.iterations, agent=args.agent,
                       approve=args.approve, name=args.name, runner=args.runner,
                       echo_log=args.log, headless=args.headless, detach=args.detach)
        if args.command == "attach":
            from tui.commands import attach

            return attach(args.run)
        if args.command == "resume":
            from tui.commands import resume

            return resume(args.run, iterations=args.iterations, echo_log=args.log)
        if args.command == "status":
            from tui.commands import status

            return status(args.run, as_json=args.json)
        if args.command == "revert":
            from tui.commands import revert

            return revert(args.run, args.node)
        if args.command == "doctor":
            return _doctor()
        if args.command in ("approve", "reject", "stop"):
            from engine import events
            from tui.commands import post

            command = {
                "approve": lambda: events.Approve(),
                "reject": lambda: events.Reject(reason=args.reason),
                "stop": lambda: events.Stop(),
            }[args.command]()
            return post(args.run, command)
    except UsageError as exc:
        print(f"proctor: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("proctor: interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    # Run the imported module's main so UsageError is the same class the commands raise.
    from tui.cli import main as module_main

    sys.exit(module_main())
