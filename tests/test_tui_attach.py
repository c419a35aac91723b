"""Watching a run another process drives: the attached event source gives the same events
as the engine; the app attaches, approves and detaches while the run goes on; `run
--detach` leaves an engine of its own session behind, and `stop` ends it.

The engine process of those tests is tests/loop_driver.py."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scripted_agent import ScriptedAgent
from waiting import wait_for

from engine import events as ev
from engine.attach import AttachedRun
from engine.config import load_config
from engine.journal import Journal, RunEvent
from engine.loop import Engine
from engine.paths import LOCK_FILE
from engine.runs import RunSettings
from tui.app import attached_app
from tui.settings import TuiSettings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAKE = HERE / "fakeproject"

QUIET = TuiSettings(watch_files=False, show_clock=False, bell=False, toasts=False,
                    journal_poll_s=0.05)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(FAKE, root, ignore=shutil.ignore_patterns("__pycache__", "log"))
    return root


def start_engine(root: Path, name: str, iterations: int, approval: str) -> subprocess.Popen:
    """The engine of run `name` in a process of its own (tests/loop_driver.py)."""
    return subprocess.Popen(
        [sys.executable, str(HERE / "loop_driver.py"), str(root), name, str(iterations),
         approval], cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def essentials(events: list[ev.Event]) -> list[tuple]:
    """What both sources must agree on (log batching and diffs of history may differ)."""
    kept = []
    for event in events:
        match event:
            case ev.IterationStarted() | ev.ProposalDecided() | ev.NodeFinished() | \
                    ev.IterationSkipped() | ev.CodeCommitted():
                kept.append(event)
            case ev.ProposalReady(iteration=i, proposal=p, config_diff=c, awaiting_review=w):
                kept.append(("ProposalReady", i, p, c, w))
            case ev.TrainingStarted(iteration=i, node_id=n, parent_id=parent, mutation=m):
                kept.append(("TrainingStarted", i, n, parent, m))
            case ev.RunFinished(reason=reason, best_node=best):
                kept.append(("RunFinished", reason, best))
    return kept


async def test_attached_source_replays_the_same_events_the_engine_published(project):
    published: list[ev.Event] = []
    config_path = project / "configs" / "fake.yaml"
    settings = RunSettings(name="r1", config_path=str(config_path), iterations=4,
                           approval="auto", agent="scripted", runner="subprocess")
    engine = Engine.create(project, load_config(config_path), settings, ScriptedAgent(),
                           published.append)
    try:
        await engine.run()
    finally:
        engine.close()
    attached = AttachedRun(project / "log" / "r1")
    try:
        replayed = attached.poll()
        assert attached.poll() == []  # nothing new since
    finally:
        attached.close()
    assert essentials(replayed) == essentials(published)
    assert isinstance(replayed[0], ev.RunOpened) and replayed[0].total_iterations == 4
    # the latest run's log is tailed: its lines and progress, as the engine streamed them
    streamed = [line for e in published if isinstance(e, ev.LogLines) and e.iteration == 4
                for line in e.lines]
    tailed = [line for e in replayed if isinstance(e, ev.LogLines) for line in e.lines]
    assert tailed == streamed
    progress = [e for e in replayed if isinstance(e, ev.TrainingProgress)]
    assert progress and progress[-1].step == progress[-1].total == 3


async def test_attached_app_approves_detaches_and_the_run_goes_on(project):
    engine = start_engine(project, "r1", 4, "code")
    run_dir = project / "log" / "r1"
    try:
        wait_for(lambda: (run_dir / "journal.sqlite").exists(), "the run to be created")
        wait_for(lambda: _has_run_record(run_dir), "the run record")
        app = attached_app(run_dir, QUIET)
        async with app.run_test(size=(120, 36)) as pilot:
            deadline = time.monotonic() + 30
            while not (app.state.waiting_review and app.state.waiting_review.iteration == 3):
                assert time.monotonic() < deadline, "no proposal waited at iteration 3"
                await pilot.pause(0.05)
            assert "+BONUS = 0.01" in app.state.waiting_review.diff
            # a second viewer sees the same proposal at the same time
            other = AttachedRun(run_dir)
            try:
                waiting = [e for e in other.poll() if isinstance(e, ev.ProposalReady)
                           and e.awaiting_review]
            finally:
                other.close()
            assert waiting and waiting[-1].iteration == 3
            # a human edit in the checkout reaches the viewer through the journal
            siren = project / "models" / "siren.py"
            siren.write_text(siren.read_text().replace("BONUS = 0.0", "BONUS = 0.3"))
            while "models/siren.py" not in app.state.manual_edits or \
                    not app.state.waiting_review.stale_paths:
                assert time.monotonic() < deadline, "the manual edit did not reach the viewer"
                await pilot.pause(0.05)
            assert "+BONUS = 0.3" in app.state.manual_edits["models/siren.py"].diff
            shown = app.state.waiting_review
            await pilot.press("2", "a")
            assert app.sent == [ev.Approve(proposal_id=shown.proposal_id)]
            while app.state.waiting_review is not None or app.state.iteration < 3:
                assert time.monotonic() < deadline, "the engine did not take the decision"
                await pilot.pause(0.05)
            await pilot.press("q")  # attached: quits at once, the run goes on
            assert not app.is_running
        assert engine.wait(timeout=60) == 0
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
    with Journal.open_for_client(run_dir) as journal:
        assert journal.completed_iterations() == [1, 2, 3, 4]


def _has_run_record(run_dir: Path) -> bool:
    try:
        with Journal.open_for_client(run_dir) as journal:
            return bool(journal.run_events(RunEvent.RUN_CREATED))
    except Exception:
        return False


def _lock_is_free(run_dir: Path) -> bool:
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing drops the lock again
    return True


def test_run_detach_outlives_its_terminal_and_stop_ends_it(project):
    def proctor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=project,
                              capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    started = proctor("run", "configs/fake.yaml", "--detach", "--name", "d1", "--iterations",
                      "500", "--agent", "heuristic", "--approve", "auto", "--runner",
                      "subprocess")
    assert started.returncode == 0, started.stderr
    assert "proctor attach d1" in started.stdout
    run_dir = project / "log" / "d1"
    owner = json.loads((run_dir / LOCK_FILE).read_text())
    # the engine leads a session of its own: a hang-up of ours never reaches it
    assert os.getsid(owner["pid"]) == owner["pid"] != os.getsid(0)
    assert (run_dir / "engine.out").exists()
    taken = proctor("run", "configs/fake.yaml", "--detach", "--name", "d1")
    assert taken.returncode == 2 and "already exists" in taken.stderr
    stopped = proctor("stop", "d1")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: _lock_is_free(run_dir), "the engine to exit", timeout=60)
    with Journal.open_for_client(run_dir) as journal:
        stops = journal.run_events(RunEvent.STOPPED)
    assert stops and stops[-1].payload["reason"] == "stopped by a human"
