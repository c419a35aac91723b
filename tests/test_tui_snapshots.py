"""Snapshots of the main views (pytest-textual-snapshot), on a real run parked at a review.

One engine process per module runs the fake experiment under the `code` policy and waits at
iteration 3 (a code edit) for a decision that never comes, so every view is in a fixed
state: fixed terminal size, no clocks, no toasts. Update with `--snapshot-update`."""

from __future__ import annotations

import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from test_tui_attach import start_engine, wait_for
from textual.pilot import Pilot
from textual.widgets import Markdown, TabbedContent

from engine import events as ev
from engine.attach import AttachedRun
from tui.app import ProctorApp, attached_app
from tui.settings import TuiSettings
from tui.widgets.best_curve import BestCurve

HERE = Path(__file__).resolve().parent
SIZE = (120, 34)
STILL = TuiSettings(watch_files=False, show_clock=False, bell=False, toasts=False,
                    journal_poll_s=0.05)


@pytest.fixture(scope="module")
def parked_run(tmp_path_factory: pytest.TempPathFactory):
    """A run whose engine waits at iteration 3 for a review (stopped at the end)."""
    root = tmp_path_factory.mktemp("snapshots") / "project"
    shutil.copytree(HERE / "fakeproject", root,
                    ignore=shutil.ignore_patterns("__pycache__", "log"))
    engine = start_engine(root, "r1", 4, "code")
    run_dir = root / "log" / "r1"

    def waiting() -> bool:
        if not (run_dir / "journal.sqlite").exists():
            return False
        try:
            attached = AttachedRun(run_dir)
        except Exception:
            return False
        try:
            events = attached.poll()
        finally:
            attached.close()
        ready = [e for e in events if isinstance(e, ev.ProposalReady)]
        return bool(ready) and ready[-1].iteration == 3 and ready[-1].awaiting_review

    try:
        wait_for(waiting, "the run to wait for a review at iteration 3", timeout=60)
        yield run_dir
    finally:
        engine.kill()
        engine.wait()


def settled(tab: str, then: Callable[[Pilot], Awaitable[None]] | None = None):
    """A `run_before` that waits until the app shows the parked state, then opens `tab`."""

    async def run_before(pilot: Pilot) -> None:
        app: ProctorApp = pilot.app  # type: ignore[assignment]
        deadline = time.monotonic() + 30
        while not (app.state.waiting_review and app.snapshot and len(app.snapshot.rows) == 2
                   and not app._snapshot_running and not app._tree_dirty):
            assert time.monotonic() < deadline, "the app never showed the parked run"
            await pilot.pause(0.05)
        await pilot.press(tab)
        if then is not None:
            await then(pilot)
        await pilot.pause()

    return run_before


def test_run_view(parked_run, snap_compare):
    assert snap_compare(attached_app(parked_run, STILL), terminal_size=SIZE,
                        run_before=settled("1"))


def test_review_view(parked_run, snap_compare):
    assert snap_compare(attached_app(parked_run, STILL), terminal_size=SIZE,
                        run_before=settled("2"))


def test_review_view_side_by_side(parked_run, snap_compare):
    async def side_by_side(pilot: Pilot) -> None:
        await pilot.press("s")

    assert snap_compare(attached_app(parked_run, STILL), terminal_size=SIZE,
                        run_before=settled("2", side_by_side))


def test_tree_view(parked_run, snap_compare):
    assert snap_compare(attached_app(parked_run, STILL), terminal_size=SIZE,
                        run_before=settled("3", _second_node))


def test_tree_view_as_a_table(parked_run, snap_compare):
    async def second_node_in_the_table(pilot: Pilot) -> None:
        await pilot.press("t")
        await _second_node(pilot)

    assert snap_compare(attached_app(parked_run, STILL), terminal_size=SIZE,
                        run_before=settled("3", second_node_in_the_table))


def test_tree_view_curve(parked_run, snap_compare):
    async def curve_drawn(pilot: Pilot) -> None:
        await _second_node(pilot)
        pilot.app.query_one("#node-tabs", TabbedContent).active = "run-curve-pane"
        curve = pilot.app.query_one("#run-curve", BestCurve)
        deadline = time.monotonic() + 10
        while "0.800" not in str(curve.content):  # drawn once its tab gave it a size
            assert time.monotonic() < deadline
            await pilot.pause(0.05)

    assert snap_compare(attached_app(parked_run, STILL), terminal_size=SIZE,
                        run_before=settled("3", curve_drawn))


async def _second_node(pilot: Pilot) -> None:
    app: ProctorApp = pilot.app  # type: ignore[assignment]
    app.tree_view.select(2)
    deadline = time.monotonic() + 10
    while app.tree_view.selected != 2:
        assert time.monotonic() < deadline
        await pilot.pause(0.05)


def test_logs_view(parked_run, snap_compare):
    async def analysis_rendered(pilot: Pilot) -> None:
        markdown = pilot.app.query_one("#doc-md", Markdown)
        deadline = time.monotonic() + 10
        while "Iter 2" not in markdown.source or not markdown.children:
            assert time.monotonic() < deadline
            await pilot.pause(0.05)
        await pilot.pause(0.2)

    assert snap_compare(attached_app(parked_run, STILL), terminal_size=SIZE,
                        run_before=settled("4", analysis_rendered))
