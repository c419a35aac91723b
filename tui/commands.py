"""What each `proctor` subcommand does. Errors the user can fix become UsageError (exit 2)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from engine.config import (
    ConfigError,
    ExperimentConfig,
    check_experiment_sections,
    find_project_root,
    load_config,
)
from tui.cli import UsageError

METRIC_ORDER = ("final_r2", "heldout_r2", "pearson_r2", "slope", "final_mse", "training_time_s",
                "steps_per_s", "total_params")


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
    from engine.logs import strip_control
    from engine.runner import RunStatus, make_runner

    config, root = _load(config_path)
    out_dir = root / "log" / "train" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "training.log"
    exploration = config.exploration
    key_file = exploration.anthropic.key_file
    plan = EvaluationPlan(
        harness=exploration.harness,
        data_cache=root / "log" / "cache" / "data",
        timeouts=exploration.timeouts,
        limits=exploration.limits,
        hide=(Path(key_file).expanduser(),) if key_file else (),
        device=device,
    )
    package = exploration.harness.split(".")[0]

    def populate(folder: Path) -> None:
        shutil.copytree(root / package, folder / package,
                        ignore=shutil.ignore_patterns("__pycache__"))

    def echo(lines: list[str]) -> None:
        if not quiet:
            for line in lines:
                print(strip_control(line))  # the run's output is data, never terminal codes
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
    print(f"\nstatus: {result.status.value}  (wall {result.wall_s:.1f} s; log {log_path})")
    if result.error:
        print(f"error: {strip_control(result.error)}")
    for name in METRIC_ORDER:
        if name in result.metrics:
            print(f"  {name:<16} {_format_metric(name, result.metrics[name])}")
    if result.warnings:
        for warning in result.warnings:
            print(f"warning: {strip_control(warning)}")
    return 0 if result.status is RunStatus.OK else 1


def _run_dir(root: Path, run: str) -> Path:
    run_dir = Path(run) if os.sep in run else root / "log" / run
    if not (run_dir / "journal.sqlite").exists():
        raise UsageError(f"no run '{run}' in {run_dir.parent} (see `ls {run_dir.parent}`)")
    return run_dir


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
    from engine.loop import Engine, EngineError, RunSettings

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
        return _detach(root, config_path, settings, echo_log)
    from engine.headless import HeadlessPrinter
    from engine.journal import JournalError

    if not headless and _interactive():
        return _run_in_tui(root, config, settings)
    printer = HeadlessPrinter(echo_log=echo_log)
    try:
        engine = Engine.create(root, config, settings, _agent_factory(None)(config, settings),
                               printer)
    except (EngineError, JournalError, FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return _drive(engine)


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _run_in_tui(root: Path, config: ExperimentConfig, settings) -> int:
    """The app with the engine inside it; the engine is built after the first paint."""
    from engine.journal import JournalError
    from engine.loop import Engine, EngineError
    from tui.app import live_app
    from tui.source import SourceError

    def open_engine(publish):
        try:
            agent = _agent_factory(None)(config, settings)
            return Engine.create(root, config, settings, agent, publish)
        except (EngineError, JournalError, FileNotFoundError, ValueError) as exc:
            raise SourceError(str(exc)) from None

    app = live_app(open_engine)
    app.run()
    if app.failure:
        raise UsageError(app.failure)
    print(f"run {settings.name}: {app.state.phase}. `proctor resume {settings.name}` continues "
          f"it; `proctor status {settings.name}` shows its nodes.")
    return app.return_code or 0


DETACH_START_S = 60.0  # how long `run --detach` waits for the engine to record the run


def _detach(root: Path, config_path: Path, settings, echo_log: bool) -> int:
    """Start the engine as a process of its own session (it outlives the terminal and the SSH
    connection), its output in log/<run>/engine.out; return once the run is recorded."""
    import subprocess

    from engine.journal import Journal, JournalError, RunEvent
    from engine.loop import RUN_NAME

    if not RUN_NAME.match(settings.name):
        raise UsageError(f"run name '{settings.name}' must be letters, digits, '_', '.', '-'")
    run_dir = root / "log" / settings.name
    if (run_dir / "journal.sqlite").exists():
        raise UsageError(f"run '{settings.name}' already exists in {run_dir}: use "
                         f"`proctor resume {settings.name}` or pick another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "tui.cli", "run", str(config_path.resolve()), "--headless",
            "--name", settings.name, "--iterations", str(settings.iterations),
            "--approve", settings.approval, "--agent", settings.agent,
            "--runner", settings.runner, *(["--log"] if echo_log else [])]
    out_path = run_dir / "engine.out"
    with open(out_path, "ab") as out:
        process = subprocess.Popen(argv, cwd=Path.cwd(), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + DETACH_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = out_path.read_text(errors="replace").strip().splitlines()[-15:]
            raise UsageError(f"the engine stopped at once (exit code {process.returncode}):\n"
                             + "\n".join(tail))
        if (run_dir / "journal.sqlite").exists():
            try:
                with Journal.open_for_client(run_dir) as journal:
                    if journal.run_events(RunEvent.RUN_CREATED):
                        break
            except JournalError:
                pass  # created a moment ago: its schema is not there yet
        time.sleep(0.1)
    else:
        raise UsageError(f"the engine (pid {process.pid}) did not record the run within "
                         f"{DETACH_START_S:.0f} s; see {out_path}")
    print(f"run {settings.name} started in the background (pid {process.pid}); "
          f"its output goes to {out_path}")
    print(f"  watch and review:  proctor attach {settings.name}")
    print(f"  approve/reject:    proctor approve {settings.name}  |  "
          f"proctor reject {settings.name} --reason TEXT")
    print(f"  stop it:           proctor stop {settings.name}")
    return 0


def attach(run: str) -> int:
    """Open the TUI on a run another process drives; quitting leaves the run going."""
    run_dir = _run_dir(Path.cwd(), run)
    if not _interactive():
        raise UsageError("attach needs a terminal; `proctor status` prints a run's nodes")
    from tui.app import attached_app

    app = attached_app(run_dir)
    app.run()
    if app.failure:
        raise UsageError(app.failure)
    return 0


def resume(run: str, *, iterations: int | None, echo_log: bool) -> int:
    from engine.headless import HeadlessPrinter
    from engine.journal import Journal, JournalError, RunLockedError
    from engine.loop import Engine, EngineError

    run_dir = _run_dir(Path.cwd(), run)
    try:
        engine = Engine.reopen(run_dir, _agent_factory(None), HeadlessPrinter(echo_log=echo_log),
                               iterations=iterations)
    except RunLockedError as exc:
        # The engine is alive: a paused run is resumed in place, anything else is refused.
        with Journal.open_for_client(run_dir) as journal:
            if journal.state("paused") is None:
                raise UsageError(str(exc)) from None
            journal.post_command("ResumeRun", {})
        print(f"asked the running engine of {run_dir.name} to resume")
        return 0
    except (EngineError, JournalError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    engine.journal.set_state("paused", None)
    return _drive(engine)


def _drive(engine) -> int:
    try:
        asyncio.run(engine.run())
    finally:
        engine.close()
    return 0


def status(run: str, *, as_json: bool) -> int:
    from engine.journal import Journal, JournalError, RunEvent, Step
    from engine.tree import Node, Tree

    run_dir = _run_dir(Path.cwd(), run)
    try:
        journal = Journal.open_for_client(run_dir)
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    with journal:
        created = journal.run_events(RunEvent.RUN_CREATED)
        config = ExperimentConfig.model_validate(created[0].payload["config"])
        tree = Tree(block_size=config.exploration.block_size, score=config.exploration.score,
                    c=config.exploration.ucb_c)
        for iteration in journal.completed_iterations():
            record = journal.payload(iteration, Step.RECORDED)
            if record and record.get("node"):
                tree.add(Node.from_dict(record["node"]))
        unfinished = journal.unfinished_iteration()
        paused = journal.state("paused")
    rows = tree.rows(block_only=False)
    if as_json:
        print(json.dumps([row.__dict__ for row in rows], default=str))
        return 0
    print(f"run {run_dir.name}: {len(tree)} nodes" + (
        f", iteration {unfinished} in progress" if unfinished else "") + (
        f", PAUSED: {paused}" if paused else ""))
    print(f"{'node':>5} {'parent':>6} {'R2':>8} {'score':>7} {'visits':>6}  status    mutation")
    for row in sorted(rows, key=lambda r: r.node_id):
        parent = "root" if row.parent_id is None else str(row.parent_id)
        r2 = "nan" if not math.isfinite(row.r2) else f"{row.r2:.4f}"
        code = "[CODE] " if row.code_changed else ""
        print(f"{row.node_id:>5} {parent:>6} {r2:>8} {row.score:>7.3f} {row.visits:>6}  "
              f"{row.status:<9} {code}{row.mutation}")
    best = tree.best_node()
    if best is not None:
        print(f"best: node {best.id}, R2 {best.r2:.4f}")
    return 0


def revert(run: str, node_id: int) -> int:
    """Post a Revert of a finished node; the engine adds the revert node at its next
    iteration (a stopped run: when it is resumed)."""
    from engine import events
    from engine.journal import Journal, JournalError, Step

    run_dir = _run_dir(Path.cwd(), run)
    try:
        with Journal.open_for_client(run_dir) as journal:
            record = journal.payload(node_id, Step.RECORDED)
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    node = (record or {}).get("node")
    if not node:
        raise UsageError(f"run {run_dir.name} has no finished node {node_id} "
                         f"(see `proctor status {run}`)")
    if node.get("status") not in ("done", "diverged"):
        raise UsageError(f"node {node_id} is {node.get('status')}: only finished nodes can be "
                         "reverted")
    post(run, events.Revert(node_id))
    print(f"node {node_id} will be reverted at the run's next iteration "
          f"(if the run is stopped: proctor resume {run_dir.name})")
    return 0


def post(run: str, command) -> int:
    from engine.journal import Journal, JournalError

    run_dir = _run_dir(Path.cwd(), run)
    try:
        with Journal.open_for_client(run_dir) as journal:
            payload = command.to_payload()
            kind = payload.pop("kind")
            journal.post_command(kind, payload)
    except JournalError as exc:
        raise UsageError(str(exc)) from None
    print(f"sent {type(command).__name__.lower()} to run {run_dir.name}")
    return 0
