"""What each `proctor` subcommand does. Errors the user can fix become UsageError (exit 2)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import TextIO

from engine.config import (
    ConfigError,
    ExperimentConfig,
    check_experiment_sections,
    find_project_root,
    load_config,
)
from engine.logs import strip_control
from engine.paths import RunPaths, log_root, run_dir_of, train_dir
from tui.usage import UsageError

METRIC_ORDER = ("final_r2", "heldout_r2", "pearson_r2", "slope", "final_mse", "training_time_s",
                "steps_per_s", "total_params")


def say(text: str, file: TextIO | None = None) -> None:
    """Print a line for the user; text that agents, children or humans wrote is part of
    most lines, so no terminal escape passes."""
    print(strip_control(text), file=file or sys.stdout)


def _load(config_path: Path) -> tuple[ExperimentConfig, Path]:
    try:
        config = load_config(config_path)
        root = find_project_root(config_path)
        check_experiment_sections(config_path, config, root)
    except ConfigError as exc:
        raise UsageError(f"bad config:\n{exc}") from None
    return config, root


def _format_metric(name: str, value: object) -> str:
    if isinstance(value, float):
        if name == "total_params" and value.is_integer():
            return f"{int(value):,}"
        if not math.isfinite(value):
            return str(value)
        if name == "final_mse":
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def train(config_path: Path, *, runner: str, device: str | None, quiet: bool) -> int:
    """Run the config once through the four sandboxed steps and print the scorer's metrics."""
    from engine.evaluation import EvaluationPlan, evaluate
    from engine.runner import RunStatus, make_runner
    from engine.runs import package_of

    config, root = _load(config_path)
    out_dir = train_dir(root, time.strftime("%Y%m%d-%H%M%S"))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write the results of the run under {log_root(root)}: "
                         f"{exc.strerror or exc}") from None
    log_path = out_dir / "training.log"
    plan = EvaluationPlan.of(config.exploration, root, device)
    package = package_of(config)

    def populate(folder: Path) -> None:
        shutil.copytree(root / package, folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))

    def echo(lines: list[str]) -> None:
        if not quiet:
            for line in lines:
                say(line)  # the run's output is data, never terminal codes
            sys.stdout.flush()

    async def go():
        instance = make_runner(runner)
        try:
            return await evaluate(instance, plan, out_dir / "sandbox", populate,
                                  config_path.read_text(encoding="utf-8"), log_path,
                                  on_output=echo)
        finally:
            await instance.aclose()

    result = asyncio.run(go())
    say(f"\nstatus: {result.status.value}  (wall {result.wall_s:.1f} s; log {log_path})")
    if result.error:
        say(f"error: {result.error}")
    for name in METRIC_ORDER:
        if name in result.metrics:
            say(f"  {name:<16} {_format_metric(name, result.metrics[name])}")
    for warning in result.warnings:
        say(f"warning: {warning}")
    return 0 if result.status is RunStatus.OK else 1


def find_run(run: str) -> Path:
    """The folder of run `run` (a name under ./log/, or a path); UsageError when it is none."""
    folder = Path(run) if os.sep in run else run_dir_of(Path.cwd(), run)
    if not RunPaths(folder).journal.exists():
        raise UsageError(f"no run '{run}' in {folder.parent} (see `ls {folder.parent}`)")
    return folder


def _agent_factory(name_override: str | None):
    from engine.agents import make_agent

    def build(config, settings):
        return make_agent(name_override or settings.agent, config)

    return build


def run(config_path: Path, *, iterations: int | None, agent: str | None, approve: str | None,
        name: str | None, runner: str | None, echo_log: bool, headless: bool = True,
        detach: bool = False) -> int:
    """Start a new exploration run: in the TUI (`headless` off, on a terminal), headless, or
    `detach`ed in a background process."""
    from engine.agents import default_agent_name
    from engine.runs import RunSettings

    config, root = _load(config_path)
    exploration = config.exploration
    settings = RunSettings(
        name=name or f"{config_path.stem}_{time.strftime('%Y%m%d-%H%M%S')}",
        config_path=str(config_path.resolve()),
        iterations=iterations or exploration.iterations,
        approval=approve or exploration.approval,
        agent=agent or exploration.agent or default_agent_name(),
        runner=runner or exploration.runner,
    )
    if detach:
        return _detach(root, config_path, settings, echo_log, exploration.parallel)
    if not headless and _interactive():
        return _run_in_tui(root, config, settings)
    from engine.headless import HeadlessPrinter

    return _drive(_create_engine(root, config, settings, HeadlessPrinter(echo_log=echo_log)))


def baseline(config_path: Path, *, sampler: str, trials: int | None, name: str | None,
             runner: str | None, echo_log: bool, headless: bool = True,
             detach: bool = False) -> int:
    """A search baseline as a run of its own: `run` with Optuna's `sampler` as the agent and
    nothing waiting for a human (`engine.agents.optuna_search`)."""
    from engine.agents import AgentUnavailable, make_agent
    from engine.agents.optuna_search import agent_name

    agent = agent_name(sampler)
    try:  # no optuna, no search space: one line before anything starts
        make_agent(agent, load_config(config_path))
    except ConfigError as exc:
        raise UsageError(f"bad config:\n{exc}") from None
    except AgentUnavailable as exc:
        raise UsageError(str(exc)) from None
    name = name or f"{config_path.stem}_{sampler}_{time.strftime('%Y%m%d-%H%M%S')}"
    return run(config_path, iterations=trials, agent=agent, approve="auto", name=name,
               runner=runner, echo_log=echo_log, headless=headless, detach=detach)


def _create_engine(root: Path, config: ExperimentConfig, settings, publish):
    """A new run's engine; whatever stops its creation (a taken name, a folder that is not
    writable, a full disk) is one UsageError."""
    from engine.journal import JournalError
    from engine.loop import Engine
    from engine.runs import EngineError

    try:
        agent = _agent_factory(None)(config, settings)
        return Engine.create(root, config, settings, agent, publish)
    except (EngineError, JournalError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # the engine words its own; this is what reached us unworded
        raise UsageError(f"cannot create run '{settings.name}': {exc}") from None


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _run_in_tui(root: Path, config: ExperimentConfig, settings) -> int:
    """The app with the engine inside it; the engine is built after the first paint."""
    from tui.app import live_app
    from tui.source import SourceError

    def open_engine(publish):
        try:
            return _create_engine(root, config, settings, publish)
        except UsageError as exc:
            raise SourceError(str(exc)) from None

    app = live_app(open_engine)
    app.run()
    if app.failure:
        raise UsageError(app.failure)
    say(f"run {settings.name}: {app.state.phase}. `proctor resume {settings.name}` continues "
        f"it; `proctor status {settings.name}` shows its nodes.")
    return app.return_code or 0


DETACH_START_S = 60.0  # how long `run --detach` waits for the engine to record the run


def _detach(root: Path, config_path: Path, settings, echo_log: bool, slots: int = 1) -> int:
    """Start the engine as a process of its own session (it outlives the terminal and the SSH
    connection), its output in log/<run>/engine.out; return once the run is recorded.

    Only the engine makes the run folder: its output goes to a file in log/ until the run is
    recorded, then moves into the run folder. An engine that fails to start leaves nothing."""
    import subprocess

    paths = RunPaths(run_dir_of(root, settings.name))
    if paths.journal.exists():
        raise UsageError(f"run '{settings.name}' already exists in {paths.run_dir}: use "
                         f"`proctor resume {settings.name}` or pick another --name")
    made = [folder for folder in (log_root(root), paths.run_dir) if not folder.exists()]
    try:
        log_root(root).mkdir(parents=True, exist_ok=True)
        fd, starting = tempfile.mkstemp(prefix=".engine-starting-", suffix=".out",
                                        dir=log_root(root))
    except OSError as exc:
        _remove_unrecorded(paths, made)
        raise UsageError(f"cannot create run '{settings.name}': {exc}") from None
    argv = [sys.executable, "-m", "tui.cli", "run", str(config_path.resolve()), "--headless",
            "--name", settings.name, "--iterations", str(settings.iterations),
            "--approve", settings.approval, "--agent", settings.agent,
            "--runner", settings.runner, *(["--log"] if echo_log else [])]
    with open(fd, "rb+") as out:
        process = subprocess.Popen(argv, cwd=Path.cwd(), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _await_record(paths, process, out, starting)
        except BaseException:
            if process.poll() is not None:  # it is gone: nothing of its start stays behind
                os.unlink(starting)
                _remove_unrecorded(paths, made)
            raise
    output = Path(starting)
    try:
        os.replace(starting, paths.engine_out)
        output = paths.engine_out
    except OSError as exc:
        say(f"warning: the engine's output stays in {starting} ({exc})", file=sys.stderr)
    say(f"run {settings.name} started in the background (pid {process.pid}); "
        f"its output goes to {output}")
    say(f"  watch and review:  proctor attach {settings.name}")
    say(f"  approve/reject:    proctor approve {settings.name}  |  "
        f"proctor reject {settings.name} --reason TEXT"
        + ("  (add --proposal ID while several wait)" if slots > 1 else ""))
    if slots > 1:
        say(f"  what runs where:   proctor status {settings.name}")
    say(f"  stop it:           proctor stop {settings.name}")
    return 0


def _remove_unrecorded(paths: RunPaths, made: list[Path]) -> None:
    """Remove the folders of `made` (log/, the run folder) that a failed start left: the run
    folder unless the run was recorded (then it can be resumed), log/ when it is empty."""
    for folder in reversed(made):
        if not folder.exists():
            continue
        if folder == paths.run_dir:
            if not _recorded(paths):
                shutil.rmtree(folder, ignore_errors=True)
        elif not any(folder.iterdir()):
            folder.rmdir()


def _recorded(paths: RunPaths) -> bool:
    """Whether the run's creation record is in its journal (the run exists for viewers)."""
    from engine.journal import Journal, JournalError, RunEvent

    if not paths.journal.exists():
        return False
    try:
        with Journal.open_for_client(paths.run_dir) as journal:
            return bool(journal.run_events(RunEvent.RUN_CREATED))
    except JournalError:
        return False  # created a moment ago: its schema is not there yet


def _await_record(paths: RunPaths, process, out, out_path: str) -> None:
    """Wait (bounded) until the detached engine has recorded the run; UsageError when it
    ended first (its own words when it refused with a usage error) or took too long."""
    deadline = time.monotonic() + DETACH_START_S
    while not _recorded(paths):
        if process.poll() is not None:
            out.seek(0)
            tail = out.read().decode(errors="replace").strip().splitlines()[-15:]
            if process.returncode == 2 and len(tail) == 1:  # the engine's one-line refusal
                raise UsageError(tail[0].removeprefix("proctor: "))
            if not tail:
                raise UsageError(f"cannot create run '{paths.name}': the engine stopped at once "
                                 f"(exit code {process.returncode}) and could not write why"
                                 + _no_space(paths.run_dir.parent))
            raise UsageError(f"the engine stopped at once (exit code {process.returncode}):\n"
                             + "\n".join(tail))
        if time.monotonic() > deadline:
            raise UsageError(f"the engine (pid {process.pid}) did not record the run within "
                             f"{DETACH_START_S:.0f} s; its output goes to {out_path}")
        time.sleep(0.1)


def _no_space(folder: Path) -> str:
    """`: no space left on the device of FOLDER` when that is so, else ''."""
    try:
        full = os.statvfs(folder).f_bavail == 0
    except OSError:
        return ""
    return f": no space left on the device of {folder}" if full else ""


def attach(run: str) -> int:
    """Open the TUI on a run another process drives; quitting leaves the run going."""
    folder = find_run(run)
    if not _interactive():
        raise UsageError("attach needs a terminal; `proctor status` prints a run's nodes")
    from tui.app import attached_app

    app = attached_app(folder)
    app.run()
    if app.failure:
        raise UsageError(app.failure)
    return 0


def resume(run: str, *, iterations: int | None, echo_log: bool) -> int:
    """Continue a stopped or crashed run here; a run an engine drives is asked to resume."""
    from engine.headless import HeadlessPrinter
    from engine.journal import JournalError, RunLockedError
    from engine.loop import Engine
    from engine.runs import EngineError
    from engine.state import RunState

    folder = find_run(run)
    try:
        engine = Engine.reopen(folder, _agent_factory(None), HeadlessPrinter(echo_log=echo_log),
                               iterations=iterations)
    except RunLockedError:
        return _resume_live(folder, iterations)
    except (EngineError, JournalError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    RunState(engine.journal).paused = None
    return _drive(engine)


def _resume_live(folder: Path, iterations: int | None) -> int:
    """Post ResumeRun to the engine that holds the run, whatever the journal says: a pause
    for a full disk is held in the engine's memory only (the journal could not take it)."""
    from engine import events
    from engine.state import RunState

    with open_run(folder) as attached:
        paused = RunState(attached.reader.journal).paused
        attached.send(events.ResumeRun())
    if paused is not None:
        say(f"asked the engine driving run {folder.name} to resume (paused: {paused})")
    else:
        say(f"asked the engine driving run {folder.name} to resume: its journal shows no "
            "pause, so it resumes if it holds one the journal could not record (a full disk), "
            "and otherwise nothing changes")
    if iterations is not None:
        say(f"--iterations applies when no engine drives the run: `proctor stop {folder.name}`"
            f", then `proctor resume {folder.name} --iterations {iterations}`")
    return 0


def _drive(engine) -> int:
    """Run the engine to its end; 1 when the run ended in error (its journal was lost)."""
    try:
        asyncio.run(engine.run())
    finally:
        engine.close()
    return 1 if engine.failure else 0


def open_run(folder: Path):
    """The run as a viewer sees it (commands go to its journal), closed after use."""
    from engine.attach import AttachedRun
    from engine.journal import JournalError

    try:
        return closing(AttachedRun(folder))
    except JournalError as exc:
        raise UsageError(str(exc)) from None


def ab(run: str, node: int, seeds: int) -> int:
    """A/B-test node `node`'s code change against its parent's over `seeds` paired seeds."""
    from engine.ab_runs import run_ab
    from engine.journal import JournalError, RunLockedError
    from engine.runs import EngineError

    folder = find_run(run)
    try:
        comparison = asyncio.run(run_ab(folder, node, seeds, say))
    except RunLockedError:
        raise UsageError(f"an engine drives run {run}: stop it (`proctor stop {run}`) for the "
                         "A/B test, then resume it") from None
    except (EngineError, JournalError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    say(f"node {node}: {comparison.summary()}")
    return 0


def stats(run: str, *, as_json: bool) -> int:
    """Which changes paid off in the run (`engine.stats`)."""
    from engine.journal import Journal, JournalError
    from engine.stats import run_stats

    try:
        journal = Journal.open_for_client(find_run(run))
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    with journal:
        figures = run_stats(journal)
    if as_json:
        print(json.dumps(figures.to_dict()))
        return 0
    say(f"run {run}: {figures.nodes} nodes, {figures.code_changes} code changes, "
        f"{figures.config_changes} config changes")
    if figures.code_changes:
        say(f"  code changes: {figures.code_ran_cleanly} ran cleanly, "
            f"{figures.code_beat_parent} beat their parent "
            f"({_percent(figures.code_success_rate)}), {figures.code_confirmed} of "
            f"{figures.code_ab_tested} A/B-tested confirmed")
    say(f"  mean R2 gain over the parent: code {_signed(figures.mean_gain_code)}, "
        f"config {_signed(figures.mean_gain_config)}")
    say(f"  training {figures.training_hours * 60:.1f} min; best R2 "
        f"{_plain(figures.best_r2)}, {_signed(figures.r2_gained)} over the first node; "
        f"{_plain(figures.r2_points_per_hour, 1)} points of R2 per hour")
    cost = f"${figures.agent_cost_usd:.2f}"
    per_point = f", ${figures.usd_per_r2_point:.3f} per point of R2" \
        if figures.usd_per_r2_point is not None else ""
    say(f"  agent cost {cost}{per_point}")
    if figures.kinds:
        say(f"{'count':>5} {'mean gain':>10} {'total':>8}  change")
        for kind in figures.kinds:
            say(f"{kind.count:>5} {kind.mean_gain:>+10.4f} {kind.total_gain:>+8.4f}  "
                f"{kind.kind}")
    return 0


def report(run: str, *, against: list[str]) -> int:
    """Write the run's report (`engine.report`), its curves overlaid with `against`'s."""
    from engine.journal import JournalError
    from engine.plots import AnalyticsMissing
    from engine.report import write_report
    from engine.tree import TreeError

    folder = find_run(run)
    others = [find_run(other) for other in against]
    try:
        path = write_report(folder, others)
    except (AnalyticsMissing, JournalError, TreeError) as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot write the report in {folder}: {exc.strerror or exc}") from None
    say(f"report of run {run}: {path}")
    return 0


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.4f}"


def _plain(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def status(run: str, *, as_json: bool) -> int:
    """What the run is doing (its engine, a pause, every waiting review with its commands,
    what is in flight in which slot and where) and its node table."""
    from tui.activity import read_activity

    with open_run(find_run(run)) as attached:
        reader = attached.reader
        reader.refresh()
        activity = read_activity(reader)
        rows = reader.tree.rows(block_only=False)
        best = reader.tree.best_node()
    if as_json:
        print(json.dumps({**activity.to_dict(), "best": best.id if best else None,
                          "nodes": [row.__dict__ for row in rows]}, default=str))
        return 0
    say(f"run {activity.name}: {len(rows)} nodes; {activity.progress()}")
    if activity.paused is not None:
        say(f"  PAUSED: {activity.paused}  (continue it: proctor resume {activity.name})")
    for review in activity.reviews:
        approve, reject = activity.decide_commands(review)
        say(f"  waiting for review: {review.summary()}")
        say(f"    {approve}")
        say(f"    {reject}")
    if activity.in_flight:
        say("  in flight:")
        for flight in activity.in_flight:
            say(f"    {flight.describe()}")
    say(f"{'node':>5} {'parent':>6} {'R2':>8} {'score':>7} {'visits':>6}  status    mutation")
    for row in sorted(rows, key=lambda r: r.node_id):
        parent = "root" if row.parent_id is None else str(row.parent_id)
        r2 = "nan" if not math.isfinite(row.r2) else f"{row.r2:.4f}"
        # the marker, unless the mutation already says so (the agents write "[code] ...")
        code = "[CODE] " if row.code_changed and not row.mutation.lower().startswith(
            "[code]") else ""
        say(f"{row.node_id:>5} {parent:>6} {r2:>8} {row.score:>7.3f} {row.visits:>6}  "
            f"{row.status:<9} {code}{row.mutation}")
    if best is not None:
        say(f"best: node {best.id}, R2 {best.r2:.4f}")
    return 0


def jobscript(config_path: Path) -> int:
    """Print the batch job script each Dask worker job of CONFIG's cluster would run
    (`exploration.executor.dask.cluster`); nothing is submitted."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise UsageError(f"bad config:\n{exc}") from None
    cluster = config.exploration.executor.dask.cluster
    if cluster is None:
        raise UsageError(f"{config_path} has no exploration.executor.dask.cluster (slurm, lsf "
                         "or pbs): there is no job script to print")
    from engine.executors import ExecutorError
    from engine.executors.jobqueue import render_job_script

    try:
        script = render_job_script(config)
    except ExecutorError as exc:
        raise UsageError(str(exc)) from None
    print(script.rstrip("\n"))
    return 0


def revert(run: str, node_id: int) -> int:
    """Post a Revert of a finished node; the engine adds the revert node at its next
    iteration (a stopped run: when it is resumed)."""
    from engine import events
    from engine.journal import Step

    folder = find_run(run)
    with open_run(folder) as attached:
        record = attached.reader.journal.payload(node_id, Step.RECORDED)
        node = (record or {}).get("node")
        if not node:
            raise UsageError(f"run {folder.name} has no finished node {node_id} "
                             f"(see `proctor status {run}`)")
        if node.get("status") not in ("done", "diverged"):
            raise UsageError(f"node {node_id} is {node.get('status')}: only finished nodes can "
                             "be reverted")
        attached.send(events.Revert(node_id))
    say(f"node {node_id} will be reverted at the run's next iteration "
        f"(if the run is stopped: proctor resume {folder.name})")
    return 0


def stop(run: str) -> int:
    """Ask the engine of the run to stop cleanly (a stopped run can be resumed)."""
    from engine import events

    folder = find_run(run)
    with open_run(folder) as attached:
        attached.send(events.Stop())
    say(f"sent stop to run {folder.name}")
    return 0
