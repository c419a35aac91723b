"""The `proctor` command line. Start-up stays light: heavy modules load inside the commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tui.usage import EXIT_BAD_INPUT, UsageError

EXIT_READER_GONE = 141  # what a shell reports for a command that SIGPIPE ended (128 + 13)


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
    run.add_argument("--iterations", type=_iteration_count, help="iterations to run in total")
    run.add_argument("--headless", action="store_true", help="no TUI: plain progress lines")
    run.add_argument("--detach", action="store_true",
                     help="run in the background (survives logout); prints how to attach")
    run.add_argument("--agent",
                     choices=["heuristic", "anthropic", "optuna-tpe", "optuna-random"],
                     help="who proposes (default: anthropic with a key, else heuristic; "
                     "optuna-*: a search baseline, see baseline)")
    run.add_argument("--approve", choices=["auto", "code", "all"],
                     help="what waits for a human: nothing, code edits, everything")
    run.add_argument("--name", help="run name (default: <config>_<date-time>)")
    run.add_argument("--runner", choices=["zygote", "subprocess"], help="how runs start")
    run.add_argument("--log", action="store_true", help="echo the training logs")

    baseline = commands.add_parser(
        "baseline", help="search CONFIG's search space with Optuna (TPE or random) as a run",
        description="A baseline on the same budget: Optuna's TPE or random sampler proposes "
        "each trial (every key of exploration.search_space sampled, from the base config), "
        "run through the same sandboxed runner and evaluator as the agent's nodes and "
        "recorded as a run of its own (status, attach, stats, resume work on it). Needs "
        "optuna: pip install 'proctor[analytics]'.")
    baseline.add_argument("config", type=Path, help="experiment config (YAML)")
    baseline.add_argument("--sampler", choices=["tpe", "random"], default="tpe",
                          help="Optuna's sampler (default: tpe), seeded by exploration.seed")
    baseline.add_argument("--trials", type=_iteration_count,
                          help="trials, one per iteration (default: exploration.iterations)")
    baseline.add_argument("--name", help="run name (default: <config>_<sampler>_<date-time>)")
    baseline.add_argument("--headless", action="store_true", help="no TUI: plain progress lines")
    baseline.add_argument("--detach", action="store_true",
                          help="run in the background (survives logout); prints how to attach")
    baseline.add_argument("--runner", choices=["zygote", "subprocess"], help="how runs start")
    baseline.add_argument("--log", action="store_true", help="echo the training logs")

    on_run = {name: _on_run(commands, name, help, description)
              for name, (help, description) in RUN_COMMANDS.items()}
    on_run["resume"].add_argument("--iterations", type=_iteration_count,
                                  help="raise the iteration count")
    on_run["resume"].add_argument("--log", action="store_true", help="echo the training logs")
    for name in ("status", "stats"):
        on_run[name].add_argument("--json", action="store_true", help="machine-readable fields")
    on_run["reject"].add_argument("--reason", required=True, help="why (the agent reads it)")
    for name in ("approve", "reject"):
        on_run[name].add_argument(
            "--proposal", help="the proposal id `proctor status` shows (refused when another "
            "one waits)")
    on_run["revert"].add_argument("node", type=_positive_int, help="the node to revert")
    on_run["ab"].add_argument("node", type=_positive_int, help="the code node to test")
    on_run["ab"].add_argument("--seeds", type=_seed_count, default=3,
                              help="paired seeds, 2 to 50 (default 3)")
    on_run["report"].add_argument(
        "--against", action="append", default=[], metavar="RUN",
        help="another run whose curves the plots overlay (repeatable): a baseline, say")
    jobscript = commands.add_parser(
        "jobscript", help="print the batch job script a Dask cluster config submits",
        description="Print the batch script (Slurm, LSF or PBS) that each Dask worker job of "
        "CONFIG's exploration.executor.dask.cluster would run, to check it before a run "
        "submits it. Nothing is submitted; no queue is needed.")
    jobscript.add_argument("config", type=Path, help="experiment config (YAML)")
    commands.add_parser(
        "doctor", help="check the sandbox that every run gets on this machine",
        description="Run one real sandboxed child, as runs are made for this user, and print "
        "each layer of the sandbox: active, or missing and why. Exit code 1 when a layer is "
        "missing.")
    return parser


# The subcommands whose first argument is a run: (help, description or None).
RUN_COMMANDS: dict[str, tuple[str, str | None]] = {
    "attach": (
        "open the TUI on a run that runs in the background",
        "Watch and review a run started with --detach (or by another terminal). Decisions go "
        "to the run's journal; quitting leaves the run going. Any number of viewers may "
        "attach at once."),
    "resume": (
        "continue a run after a stop or a crash; lift a live run's pause",
        "Continue a stopped or crashed run in this terminal. When an engine still drives the "
        "run, ask it to resume from a pause (one the journal shows, or one only the engine "
        "knows of, such as a full disk)."),
    "status": ("print what a run is doing (engine, pause, waiting reviews, what runs in which "
               "slot and where) and its nodes", None),
    "approve": ("approve the proposal a run is waiting on (--proposal when several wait)",
                None),
    "reject": ("reject the proposal a run is waiting on (--proposal when several wait)", None),
    "stats": ("print which changes paid off in a run (code vs config, kinds, cost)",
              "Modification metrics computed from the run's journal: the code-change success "
              "rate, the mean R² gain of code and of config changes, the most effective kinds "
              "of change (count × mean gain), R² gained per hour of training and agent cost "
              "per point of R²."),
    "ab": ("A/B-test a code change: its code against its parent's over paired seeds",
           "Train the parent's code and NODE's code under NODE's config with training.seed "
           "1..K, through the same sandboxed steps as any node, and report the mean R² gain "
           "with its 95% interval, whether it exceeds the run's noise floor, and a verdict "
           "(helped, no effect, hurt). Each arm is journaled as it ends: run it again after "
           "a crash and it goes on. The run's engine must not be running."),
    "report": ("write a run's report: best-so-far curves, the tree, gains, A/B tests",
               "Write log/RUN/report/: report.md and PNG plots (matplotlib) — best R² so far "
               "per iteration and per hour of training, overlaid with every --against run, "
               "the tree coloured by R² with code changes marked and the best path drawn, "
               "the R² gain by kind of change, and the A/B tests with their intervals. "
               "Everything comes from the runs' journals."),
    "stop": ("stop a run cleanly (it can be resumed)", None),
    "revert": (
        "add a node that undoes NODE's change",
        "Add a node whose code and config are NODE's parent's, as a child of NODE (a new "
        "commit; history is never rewritten). A live run applies it at its next iteration; a "
        "stopped run when it is resumed."),
}


def _on_run(commands, name: str, help: str, description: str | None
            ) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description)
    parser.add_argument("run", help="run name (a folder of log/)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seed_count(text: str) -> int:
    value = _positive_int(text)
    if not 2 <= value <= 50:
        raise argparse.ArgumentTypeError(f"{value} seeds: an A/B test takes 2 to 50")
    return value


def _iteration_count(text: str) -> int:
    from engine.config import MAX_ITERATIONS

    value = _positive_int(text)
    if value > MAX_ITERATIONS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_ITERATIONS:,}")
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


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "doctor":
        return _doctor()
    from tui import commands

    if args.command == "jobscript":
        return commands.jobscript(args.config)
    if args.command == "train":
        return commands.train(args.config, runner=args.runner, device=args.device,
                              quiet=args.quiet)
    if args.command == "run":
        return commands.run(args.config, iterations=args.iterations, agent=args.agent,
                            approve=args.approve, name=args.name, runner=args.runner,
                            echo_log=args.log, headless=args.headless, detach=args.detach)
    if args.command == "baseline":
        return commands.baseline(args.config, sampler=args.sampler, trials=args.trials,
                                 name=args.name, runner=args.runner, echo_log=args.log,
                                 headless=args.headless, detach=args.detach)
    if args.command in ("approve", "reject"):
        from tui.decisions import decide

        return decide(commands.find_run(args.run), approve=args.command == "approve",
                      reason=getattr(args, "reason", ""), proposal=args.proposal)
    handlers = {
        "attach": lambda: commands.attach(args.run),
        "resume": lambda: commands.resume(args.run, iterations=args.iterations,
                                          echo_log=args.log),
        "status": lambda: commands.status(args.run, as_json=args.json),
        "stats": lambda: commands.stats(args.run, as_json=args.json),
        "revert": lambda: commands.revert(args.run, args.node),
        "ab": lambda: commands.ab(args.run, args.node, args.seeds),
        "report": lambda: commands.report(args.run, against=args.against),
        "stop": lambda: commands.stop(args.run),
    }
    return handlers[args.command]()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `proctor` console script."""
    _ensure_standard_streams()
    try:
        try:
            args = _build_parser().parse_args(argv)
        except SystemExit:
            sys.stdout.flush()  # --help into a closed pipe ends quietly too
            raise
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
        return code
    except UsageError as exc:
        from engine.logs import strip_control

        _complain(strip_control(str(exc)))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _complain("interrupted")
        return 130
    except BrokenPipeError:
        from engine.headless import discard_output, reader_gone

        if not reader_gone(sys.stdout):
            raise  # some other pipe broke: that is a real error
        discard_output(sys.stdout)  # `proctor ... | head`: end quietly
        return EXIT_READER_GONE
    except OSError as exc:  # stdout on a full disk or /dev/full: say so, in one line
        from engine.headless import discard_output

        discard_output(sys.stdout)
        _complain(f"cannot write the output: {exc.strerror or exc}")
        return 1


def _ensure_standard_streams() -> None:
    """A closed stdout or stderr (`proctor status RUN >&-`) reads as /dev/null, so printing
    never meets a missing stream."""
    import os

    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))  # noqa: SIM115 - lives as long as we do


def _complain(text: str) -> None:
    """One line on stderr; when stderr cannot take it (a detached engine's output file on a
    full disk) the exit code still says what happened."""
    try:
        print(f"proctor: {text}", file=sys.stderr, flush=True)
    except OSError:
        from engine.headless import discard_output

        discard_output(sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
