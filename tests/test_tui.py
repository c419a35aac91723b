"""The TUI against a real engine on the fast fake experiment: accept, reject with a reason,
edit in $EDITOR, revert, adopt a manual edit, pause from the palette, quit. Pilot drives the
real app; the engine runs on the app's loop with the subprocess runner, as `proctor run` does.

The scripted agent makes iteration 1 a baseline and 2 a config change (both go through
under the `code` policy); iteration 3 edits models/siren.py, so it waits for a human."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from feed_source import FeedSource
from scripted_agent import ScriptedAgent
from textual.app import App, ComposeResult
from textual.command import CommandList
from textual.widgets import DataTable, Input, Label, ProgressBar, Tree
from waiting import until

from engine import events as ev
from engine.agents.base import AgentReply
from engine.config import load_config
from engine.journal import Journal, RunEvent
from engine.loop import Engine
from engine.progress import latest_progress
from engine.proposal import CodeChange, CodeEdit, Proposal, Strategy
from engine.runs import RunSettings
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
        shown = app.state.waiting_review
        assert shown.proposal_id.startswith("3.")  # the id of the engine's journaled review
        await pilot.press("a")
        assert app.sent == [ev.Approve(proposal_id=shown.proposal_id)]
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
        shown = app.state.waiting_review
        first = shown.key
        await pilot.press("2", "r")
        assert isinstance(app.screen, ReasonScreen)
        await pilot.press("enter")  # an empty reason is refused
        assert isinstance(app.screen, ReasonScreen) and app.sent == []
        await pilot.press(*"too risky today", "enter")
        assert app.sent == [ev.Reject(proposal_id=shown.proposal_id, reason="too risky today")]
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
        shown = app.state.waiting_review
        await pilot.press("2", "e")
        await until(pilot, lambda: app.sent, "the edited version to be sent")
        sent = app.sent[-1]
        assert isinstance(sent, ev.ApproveEdited) and sent.proposal_id == shown.proposal_id
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
        app.tree_view.select(3)
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


# -- decisions name their proposal ----------------------------------------------------------


def code_proposal(mutation: str = "[code] bonus") -> Proposal:
    return Proposal(parent_id=1, strategy=Strategy.CODE_CHANGE, mutation=mutation,
                    edits=(CodeEdit(file="models/siren.py", search="BONUS = 0.0",
                                    replace="BONUS = 0.01"),))


async def test_a_decision_names_the_proposal_on_screen_and_never_a_newer_one():
    source = FeedSource()
    app = ProctorApp(source, QUIET)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: source.publish is not None, "the source")

        async def offer(proposal_id: str) -> None:
            source.publish(ev.ProposalReady(3, code_proposal(), "", "", True, proposal_id))
            await until(pilot, lambda: app.state.waiting_review is not None
                        and app.state.waiting_review.proposal_id == proposal_id, proposal_id)

        source.publish(ev.IterationStarted(3, 1, 5))
        await offer("3.1-aaaa")
        await pilot.press("2", "a")
        assert app.sent == [ev.Approve(proposal_id="3.1-aaaa")]
        await offer("3.2-bbbb")
        # a late decision about the first proposal does not close the second one
        source.publish(ev.ProposalDecided(3, False, "old", "human", proposal_id="3.1-aaaa"))
        await pilot.pause(0.2)
        assert app.state.waiting_review.proposal_id == "3.2-bbbb"
        await pilot.press("r", *"not this one")
        await offer("3.3-cccc")  # replaces the proposal being rejected while the human types
        await pilot.press("enter")
        assert app.sent == [ev.Approve(proposal_id="3.1-aaaa")]  # nothing for 3.3 or 3.2
        assert "no longer waits" in app.notices[-1].message
        await pilot.press("r", *"too big", "enter")
        assert app.sent[-1] == ev.Reject(proposal_id="3.3-cccc", reason="too big")
        assert source.commands == app.sent


async def test_the_progress_bar_follows_the_simulation_then_the_training():
    source = FeedSource()
    app = ProctorApp(source, QUIET)
    async with app.run_test(size=(120, 36)) as pilot:
        await until(pilot, lambda: source.publish is not None, "the source")
        label = app.run_view.query_one("#progress-label", Label)
        source.publish(ev.IterationStarted(4, 1, 5))
        source.publish(ev.TrainingStarted(4, 4, 1, "lr", 123))
        source.publish(latest_progress(4, ["[harness] simulating 200 frames of 3 discs -> x",
                                           "[harness] simulated frame 40/200"]))
        await until(pilot, lambda: str(label.content) == "simulating 40/200 frames", "frames")
        assert app.run_view.query_one(ProgressBar).percentage == 0.2
        assert app.state.phase == "simulating the dataset"  # the status line says so too
        source.publish(latest_progress(4, ["step 300/2000 loss 1.0e-02 steps/s 80.0"]))
        await until(pilot, lambda: str(label.content) == "training 300/2000 steps", "steps")
        assert app.run_view.query_one(ProgressBar).percentage == 0.15
        assert app.state.phase == "training"


# -- text from outside is text ---------------------------------------------------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[31m"
MARKUP = "[bold red]x[/]"
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class HostileAgent(ScriptedAgent):
    """Iteration 2 is a code change whose prose carries markup and terminal escapes, and
    whose code prints a line with escapes when the training imports it."""

    async def propose(self, context):
        if context.iteration != 2:
            return await super().propose(context)
        self.contexts.append(context)
        printing = 'BONUS = 0.0\nprint(chr(27) + "[31mLOGLINE [bold]y[/bold]" + chr(27) + "[0m")'
        proposal = Proposal(
            parent_id=context.candidates[0], strategy=Strategy.CODE_CHANGE,
            edits=(CodeEdit(file="models/siren.py", search="BONUS = 0.0", replace=printing),),
            code_change=CodeChange(file="models/siren.py", change=f"change {MARKUP}{ESCAPES}"),
            mutation="[code] cosine LR schedule", hypothesis=f"hypothesis {MARKUP}{ESCAPES}",
            analysis=f"analysis {MARKUP}{ESCAPES}")
        return AgentReply(proposal, reasoning=f"reasoning {MARKUP}{ESCAPES}")


def screen_text(app: App) -> str:
    """What the terminal shows now, as text; fails if a control character would reach it."""
    lines = []
    for strip in app.screen._compositor.render_strips():
        for segment in strip:
            assert not _CONTROL.search(segment.text), repr(segment.text)
        lines.append(strip.text)
    return "\n".join(lines)


async def test_markup_and_escapes_from_agents_children_and_humans_are_shown_as_text(project):
    loud = TuiSettings(watch_files=False, show_clock=False, bell=False, toasts=True)

    def open_engine(publish):
        config = load_config(project / "configs" / "fake.yaml")
        settings = RunSettings(name="r1", config_path=str(project / "configs" / "fake.yaml"),
                               iterations=2, approval="code", agent="scripted",
                               runner="subprocess")
        return Engine.create(project, config, settings, HostileAgent(), publish)

    app = live_app(open_engine, loud)
    async with app.run_test(size=(150, 60), notifications=True) as pilot:
        await until(pilot, waiting_at(app, 2), "the proposal of iteration 2")
        await pilot.press("2")
        await pilot.pause(0.1)
        review = screen_text(app)
        assert "[code] cosine LR schedule" in review
        assert f"hypothesis {MARKUP}" in review and f"analysis {MARKUP}" in review
        assert "pwned" not in review  # the whole escape sequence goes, not only ESC
        await pilot.press("r")
        app.screen.query_one(Input).value = f"{MARKUP}{ESCAPES}"
        await pilot.press("enter")
        await until(pilot, lambda: any(MARKUP in n.message for n in app.notices),
                    "the rejection's notice")
        await until(pilot, lambda: f"({MARKUP})" in screen_text(app), "the toast")
        await until(pilot, waiting_at(app, 2), "the proposal again")
        await pilot.press("a")
        await until(pilot, lambda: app.state.finished is not None, "the end of the run")
        await until(pilot, lambda: app.snapshot and 2 in app.snapshot.nodes
                    and app.snapshot.nodes[2].metrics, "node 2's result")
        await pilot.press("1")
        await until(pilot, lambda: "LOGLINE [bold]y[/bold]" in screen_text(app), "the log line")
        shown = next(line for line in screen_text(app).splitlines() if "LOGLINE" in line)
        assert shown.strip() == "LOGLINE [bold]y[/bold]"  # no rest of an escape either
        await pilot.press("4")  # analysis.md, rendered as markdown
        await until(pilot, lambda: f"analysis {MARKUP}" in screen_text(app), "the analysis")
        await pilot.press("3")
        await until(pilot, lambda: "[code] cosine LR schedule" in screen_text(app), "the tree")
        tree = app.tree_view.query_one(Tree)
        second = next(node for node in tree.root.children[0].children if node.data == 2)
        assert "[code] cosine LR schedule" in second.label.plain
        assert "[CODE]" in second.label.plain  # it changed code
        await pilot.press("t")
        assert app.tree_view.layout_shown == "table"
        await until(pilot, lambda: "[code] cosine LR schedule" in screen_text(app), "the table")
        assert app.tree_view.query_one(DataTable).row_count == 2


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
