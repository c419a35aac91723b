"""The TUI against a real engine on the fast fake experiment: accept, reject with a reason,
edit in $EDITOR, revert, adopt a manual edit, pause from the palette, quit. Pilot drives the
real app; the engine runs on the app's loop with the subprocess runner, as `proctor run` does.

The scripted agent makes iteration 1 a baseline and 2 a config change (both go through
under the `code` policy); iteration 3 edits models/siren.py, so it waits for a human."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from scripted_agent import ScriptedAgent
from textual.app import App, ComposeResult
from textual.command import CommandList
from textual.widgets import DataTable

from engine import events as ev
from engine.config import load_config
from engine.journal import Journal, RunEvent
from engine.loop import Engine, RunSettings
from tui.app import ProctorApp, live_app
from tui.pump import EventPump
from tui.settings import TuiSettings
from tui.widgets.file_log import FileLog
from tui.widgets.live_log import LiveLog
from tui.widgets.modals import ConfirmScreen, HelpScreen, ReasonScreen

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fakeproject"
QUIET = TuiSettings(watch_files=False, show_clock=False, bell=False, toasts=False)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(FAKE, root, ignore=shutil.ignore_patterns("__pycache__", "log"))
    return root


def tui_app(root: Path, iterations: int, agent: ScriptedAgent | None = None,
            approval: str = "code") -> ProctorApp:
    """The app as `proctor run` builds it, on a run of the fake project."""

    def open_engine(publish):
        config = load_config(root / "configs" / "fake.yaml")
        settings = RunSettings(name="r1", config_path=str(root / "configs" / "fake.yaml"),
                               iterations=iterations, approval=approval, agent="scripted",
                               runner="subprocess")
        return Engine.create(root, config, settings, agent or ScriptedAgent(), publish)

    return live_app(open_engine, QUIET)


async def until(pilot, condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Let the app run until `condition()` holds (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def waiting_at(app: ProctorApp, iteration: int) -> Callable[[], bool]:
    def check() -> bool:
        review = app.state.waiting_review
        return review is not None and review.iteration == iteration and app.reader is not None
    return check


def node(app: ProctorApp, node_id: int):
    return app.snapshot.nodes[node_id] if app.snapshot else None


async def test_accept_runs_the_proposal_and_keys_show_only_when_they_apply(project):
    app = tui_app(project, iterations=3)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, waiting_at(app, 3), "the code proposal of iteration 3")
        assert any(n.bell and "waits for your review" in n.message for n in app.notices)
        # on the Run tab the decision keys are not offered, and pressing them does nothing
        assert not app.action_applies("accept")
        await pilot.press("a")
        assert app.sent == []
        await pilot.press("2")
        assert app.action_applies("accept") and app.action_applies("edit")
        assert "+BONUS = 0.01" in app.review_view.diff_view.diff
        await pilot.press("a")
        assert app.sent == [ev.Approve(iteration=3)]
        assert not app.action_applies("accept")  # no second decision for the same proposal
        await until(pilot, lambda: app.state.finished is not None, "the end of the run")
        await until(pilot, lambda: node(app, 3) and node(app, 3).metrics, "node 3's metrics")
    third = node(app, 3)
    assert third.code_changed and str(third.status) == "done"
    diff = (project / "log" / "r1" / "nodes" / "003" / "change.diff").read_text()
    assert "+BONUS = 0.01" in diff


async def test_reject_asks_for_a_reason_and_the_agent_reads_it(project):
    agent = ScriptedAgent()
    app = tui_app(project, iterations=3, agent=agent)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, waiting_at(app, 3), "the code proposal of iteration 3")
        first = app.state.waiting_review.key
        await pilot.press("2", "r")
        assert isinstance(app.screen, ReasonScreen)
        await pilot.press("enter")  # an empty reason is refused
        assert isinstance(app.screen, ReasonScreen) and app.sent == []
        await pilot.press(*"too risky today", "enter")
        assert app.sent == [ev.Reject(reason="too risky today", iteration=3)]
        # the agent is asked again for iteration 3, with the reason in its context
        await until(pilot, lambda: app.state.waiting_review is not None
                    and app.state.waiting_review.key != first, "the second proposal")
        assert agent.contexts[-1].rejections == ("too risky today",)
        await pilot.press("a")
        await until(pilot, lambda: app.state.finished is not None, "the end of the run")


async def test_edit_in_editor_accepts_the_edited_version(project, tmp_path, monkeypatch):
    editor = tmp_path / "editor.py"
    editor.write_text(
        "import sys, pathlib\n"
        "for name in sys.argv[1:]:\n"
        "    path = pathlib.Path(name)\n"
        "    path.write_text(path.read_text().replace('BONUS = 0.01', 'BONUS = 0.05'))\n")
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    monkeypatch.delenv("VISUAL", raising=False)
    app = tui_app(project, iterations=3)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, waiting_at(app, 3), "the code proposal of iteration 3")
        await pilot.press("2", "e")
        await until(pilot, lambda: app.sent, "the edited version to be sent")
        sent = app.sent[-1]
        assert isinstance(sent, ev.ApproveEdited) and sent.iteration == 3
        assert "BONUS = 0.05" in sent.files["models/siren.py"]
        await until(pilot, lambda: app.state.finished is not None, "the end of the run")
        await until(pilot, lambda: node(app, 3) and node(app, 3).metrics, "node 3's metrics")
    third, parent = node(app, 3), node(app, node(app, 3).parent_id)
    assert third.metrics["final_r2"] == pytest.approx(parent.metrics["final_r2"] + 0.05)
    assert "+BONUS = 0.05" in (project / "log" / "r1" / "nodes" / "003" / "change.diff"
                               ).read_text()


async def test_revert_confirms_then_adds_a_node_with_the_code_before(project):
    app = tui_app(project, iterations=5)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, waiting_at(app, 3), "the code proposal of iteration 3")
        await pilot.press("2", "a")
        await until(pilot, waiting_at(app, 5), "the code proposal of iteration 5")
        await until(pilot, lambda: app.snapshot.revertable(3), "node 3 in the tree")
        await pilot.press("3")
        table = app.tree_view.query_one(DataTable)
        table.move_cursor(row=table.get_row_index("3"))
        await until(pilot, lambda: app.tree_view.selected == 3, "node 3 highlighted")
        assert app.action_applies("revert")
        await pilot.press("v")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")  # cancelled: nothing sent
        assert not any(isinstance(c, ev.Revert) for c in app.sent)
        await pilot.press("v", "y")
        assert ev.Revert(node_id=3) in app.sent
        await pilot.press("2", "a")
        await until(pilot, lambda: any("reverts the code of node 3" in n.message
                                       for n in app.notices), "the revert node")
        await until(pilot, lambda: app.state.finished is not None, "the end of the run")
        await until(pilot, lambda: any(n.strategy == "revert" and n.metrics
                                       for n in app.snapshot.nodes.values()), "its result")
        reverted = next(n for n in app.snapshot.nodes.values() if n.strategy == "revert")
        code = app.reader.files_at(reverted.id)["models/siren.py"]
    assert reverted.parent_id == 3 and "BONUS = 0.0\n" in code


async def test_manual_edit_is_shown_and_adopted_as_the_next_node(project):
    app = tui_app(project, iterations=4)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, waiting_at(app, 3), "the code proposal of iteration 3")
        siren = project / "models" / "siren.py"
        siren.write_text(siren.read_text().replace("BONUS = 0.0", "BONUS = 0.2"))
        await until(pilot, lambda: "models/siren.py" in app.state.manual_edits,
                    "the manual edit to be detected")
        assert "+BONUS = 0.2" in app.state.manual_edits["models/siren.py"].diff
        await pilot.press("2")
        assert app.action_applies("adopt_manual") and app.action_applies("ignore_manual")
        await pilot.press("m")
        assert ev.AdoptManualEdit(path="models/siren.py") in app.sent
        await until(pilot, lambda: not app.state.manual_edits, "the edit to be adopted")
        await pilot.press("a")
        await until(pilot, lambda: app.state.finished is not None, "the end of the run")
        await until(pilot, lambda: node(app, 4) and node(app, 4).metrics, "node 4's result")
        adopted = node(app, 4)
        code = app.reader.files_at(4)["models/siren.py"]
    assert adopted.strategy == "manual-edit" and adopted.author == "human"
    assert "BONUS = 0.2" in code


async def test_pause_from_the_palette_then_help_and_quit_stops_the_run(project):
    app = tui_app(project, iterations=3)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, waiting_at(app, 3), "the code proposal of iteration 3")
        await pilot.press("ctrl+p")
        await pilot.press(*"pause the run")
        await until(pilot, lambda: any(hits.option_count for hits in app.screen.query(CommandList)),
                    "palette hits")
        await pilot.press("enter")
        await until(pilot, lambda: app.state.paused is not None, "the engine to pause")
        assert app.action_applies("resume") and not app.action_applies("pause")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "q")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(pilot, lambda: not app.is_running, "the app to exit")
    with Journal.open_for_client(project / "log" / "r1") as journal:
        stops = journal.run_events(RunEvent.STOPPED)
    assert stops and stops[-1].payload["reason"] == "stopped from the TUI"


# -- the pieces that keep the app responsive -------------------------------------------------


def test_pump_merges_log_batches_and_bounds_what_waits():
    pump = EventPump(max_pending_lines=100)
    pump.publish(ev.IterationStarted(1, 1, 3))
    for batch in range(50):
        pump.publish(ev.LogLines(1, tuple(f"line {batch}-{i}" for i in range(10))))
        pump.publish(ev.TrainingProgress(1, batch, 50))
    events = pump.drain()
    assert isinstance(events[0], ev.IterationStarted)
    logs, progress = events[1], events[2:]
    # one merged batch: the newest 100 lines behind one marker; only the latest progress
    assert isinstance(logs, ev.LogLines) and len(logs.lines) == 101
    assert "400 lines skipped" in logs.lines[0] and logs.lines[-1] == "line 49-9"
    assert progress == [ev.TrainingProgress(1, 49, 50)] and pump.skipped_lines == 400
    assert pump.drain() == []


class LogApp(App[None]):
    def __init__(self, widget) -> None:
        super().__init__()
        self.widget = widget

    def compose(self) -> ComposeResult:
        yield self.widget


async def test_live_log_keeps_the_latest_lines_and_stops_following_when_scrolled_up():
    log = LiveLog(max_lines=1000)
    app = LogApp(log)
    async with app.run_test(size=(80, 20)) as pilot:
        log.write_lines([f"line {i}" for i in range(20_000)])
        await pilot.pause()
        assert log.line_count == 1000 and log.lines[-1] == "line 19999"
        assert log.follow and log.scroll_y == log.max_scroll_y
        log.focus()
        await pilot.press("pageup")
        assert not log.follow
        top = log.scroll_y
        log.write_lines([f"more {i}" for i in range(30)])
        await pilot.pause()
        assert log.unseen == 30
        assert log.scroll_y == top - 30  # the lines being read stay in place
        await pilot.press("f")
        assert log.follow and log.unseen == 0 and log.scroll_y == log.max_scroll_y


async def test_file_log_indexes_a_big_file_without_reading_it_whole_and_follows_it(tmp_path):
    path = tmp_path / "training.log"
    path.write_text("".join(f"step {i}/200000 loss {i * 0.5}\n" for i in range(200_000)))
    view = FileLog(path)
    app = LogApp(view)
    async with app.run_test(size=(80, 20)) as pilot:
        await until(pilot, lambda: view.line_count == 200_000, "the index")
        assert view.get_line(123_456) == "step 123456/200000 loss 61728.0"
        assert view.follow and view.scroll_y == view.max_scroll_y
        with path.open("a") as handle:
            handle.write("appended line\npartial")
        view.check()
        await until(pilot, lambda: view.line_count == 200_002, "the appended lines")
        assert view.get_line(200_000) == "appended line"
        assert view.get_line(200_001) == "partial"
        path.write_text("rewritten\n")  # a shorter file: indexed again from the start
        view.check()
        await until(pilot, lambda: view.line_count == 1, "the rewritten file")
        assert view.get_line(0) == "rewritten"
