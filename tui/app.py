"""The proctor app: watch a run live, review every proposal, browse the tree and the logs.

One factory builds it for the CLI and the tests: `build_app(source, settings)`, with
`live_source` (the engine inside the app, on its loop) or `AttachedSource` (a run another
process drives). Events arrive through a bounded pump and reach the widgets in batches;
decisions go back as engine commands. Attributes go down to the views (`show(...)`),
messages come up from them; every background job is a named worker whose failure lands in
`on_worker_state_changed`.

With several slots (`exploration.parallel`) the Run tab shows one slot at a time (`[` and
`]` switch; the palette names each slot), and the Review tab one of the proposals that wait
(`[` and `]` pick; each decision names the proposal shown)."""

from __future__ import annotations

import asyncio
import subprocess
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar, overload

from textual import work
from textual.app import App, ComposeResult, SuspendNotSupported
from textual.binding import Binding
from textual.widget import Widget
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerFailed, WorkerState

from engine import events as ev
from engine.logs import strip_control
from tui.palette import ACTIONS, ProctorCommands
from tui.pump import EventPump
from tui.settings import TuiSettings
from tui.slot_logs import SlotLogs
from tui.source import EventSource, SourceError
from tui.state import Notice, Review, RunState
from tui.widgets.live_log import LiveLog
from tui.widgets.logs_view import LogsView, run_documents
from tui.widgets.modals import ConfirmScreen, HelpScreen, ReasonScreen
from tui.widgets.plain import plain
from tui.widgets.review_view import ReviewView
from tui.widgets.run_view import RunView
from tui.widgets.tree_view import TreeView

if TYPE_CHECKING:
    from engine.attach import RunReader
    from tui.snapshot import RunSnapshot

TABS = ("run", "review", "tree", "logs")
# Events after which the tree (and the counters read from the journal) are read again.
_TREE_EVENTS = (ev.RunOpened, ev.TrainingStarted, ev.NodeFinished, ev.IterationSkipped,
                ev.ProposalDecided, ev.NodeReverted, ev.ManualEditResolved, ev.CodeCommitted,
                ev.RunFinished, ev.IterationStarted)
# Actions whose keys and palette entries apply only in some states (see `action_applies`).
_GATED = {entry[0].split("(")[0] for entry in ACTIONS} | {"show_slot", "pick_review"}
MAX_NOTICES_PER_BATCH = 3  # an attach replays history: do not bury the screen in toasts
STOP_WAIT_S = 30.0
V = TypeVar("V", bound=Widget)


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _View(Generic[V]):
    """An app attribute naming the one widget of its kind (each view is composed once)."""

    def __init__(self, kind: type[V]) -> None:
        self.kind = kind

    @overload
    def __get__(self, app: None, owner: type | None = None) -> _View[V]: ...

    @overload
    def __get__(self, app: App, owner: type | None = None) -> V: ...

    def __get__(self, app: App | None, owner: type | None = None) -> V | _View[V]:
        return self if app is None else app.query_one(self.kind)


class ProctorApp(App[None]):
    """The TUI for one run (live or attached)."""

    TITLE = "proctor"
    COMMANDS = App.COMMANDS | {ProctorCommands}
    CSS = """
    #tabs { height: 1fr; }
    #tabs > ContentSwitcher > TabPane { padding: 0; }
    #status { height: 1; background: $panel; color: $text; padding: 0 1; }
    #status.waiting { background: $warning 40%; }
    """
    BINDINGS = [
        Binding("1", "show_tab('run')", "Run", show=False, id="proctor.tab.run"),
        Binding("2", "show_tab('review')", "Review", show=False, id="proctor.tab.review"),
        Binding("3", "show_tab('tree')", "Tree", show=False, id="proctor.tab.tree"),
        Binding("4", "show_tab('logs')", "Logs", show=False, id="proctor.tab.logs"),
        Binding("a", "accept", "Accept", id="proctor.accept"),
        Binding("r", "reject", "Reject", id="proctor.reject"),
        Binding("e", "edit", "Edit+accept", id="proctor.edit"),
        Binding("s", "toggle_diff", "Side by side", id="proctor.diff_layout"),
        Binding("left_square_bracket", "previous_slot", "Slot ←", id="proctor.slot.previous"),
        Binding("right_square_bracket", "next_slot", "Slot →", id="proctor.slot.next"),
        Binding("left_square_bracket", "previous_review", "Proposal ←",
                id="proctor.review.previous"),
        Binding("right_square_bracket", "next_review", "Proposal →", id="proctor.review.next"),
        Binding("v", "revert", "Revert", id="proctor.revert"),
        Binding("m", "adopt_manual", "Adopt edit", id="proctor.adopt_manual"),
        Binding("i", "ignore_manual", "Ignore edit", id="proctor.ignore_manual"),
        Binding("p", "pause", "Pause", id="proctor.pause"),
        Binding("u", "resume", "Resume", id="proctor.resume"),
        Binding("question_mark", "help", "Help", id="proctor.help"),
        Binding("q", "quit", "Quit", id="proctor.quit"),
    ]

    def __init__(self, source: EventSource, settings: TuiSettings | None = None) -> None:
        super().__init__()
        self.source = source
        self.settings = settings or TuiSettings.from_env()
        self.pump = EventPump(self.settings.pending_log_lines)
        self.state = RunState()
        self.snapshot: RunSnapshot | None = None  # set once the journal was read
        self.reader: RunReader | None = None  # opened in a worker
        self.notices: deque[Notice] = deque(maxlen=200)
        self.sent: list[ev.Command] = []  # every command this app gave (newest last)
        self.failure: str | None = None  # why the run could not be opened
        self.side_by_side = False
        self._opened = False
        self._tree_dirty = False
        self._snapshot_running = False
        self._decided: set[int] = set()  # keys of the waiting proposals a decision was sent for
        self._notified_review = 0  # the newest proposal (serial) the human was told about
        self._picked_review: int | None = None  # the iteration whose proposal the human picked
        self._source_worker: Worker | None = None
        self._applies: tuple[bool, ...] = ()  # which actions applied at the last footer redraw
        self._slot_logs: SlotLogs | None = None  # made once the live log exists
        self.animation_level = "none"

    # -- building --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with TabbedContent(initial="run", id="tabs"):
            with TabPane("1 Run", id="run"):
                yield RunView(self.settings.live_log_lines, id="run-view")
            with TabPane("2 Review", id="review"):
                yield ReviewView(id="review-view")
            with TabPane("3 Tree", id="tree"):
                yield TreeView(id="tree-view")
            with TabPane("4 Logs", id="logs"):
                yield LogsView(id="logs-view")
        yield Static("starting…", id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "in-process run" if self.source.live else "attached"
        self._source_worker = self.run_worker(self._run_source(), name="source",
                                              group="source", exit_on_error=False)
        self.set_interval(self.settings.ui_flush_s, self.flush_events)
        if self.settings.show_clock:
            self.set_interval(1.0, self._show_status)
        if self.settings.watch_files:
            self.set_interval(self.settings.file_poll_s, self.check_files)

    async def _run_source(self) -> None:
        await self.source.run(self.pump.publish)

    def on_unmount(self) -> None:
        self.source.close()
        reader = self.reader
        if reader is not None:
            with reader.lock:
                reader.close()

    run_view = _View(RunView)
    review_view = _View(ReviewView)
    tree_view = _View(TreeView)
    logs_view = _View(LogsView)

    @property
    def live_log(self) -> LiveLog:
        return self.run_view.live_log

    @property
    def slot_logs(self) -> SlotLogs:
        """Every slot's live log; the Run tab shows `slot_logs.shown`'s."""
        if self._slot_logs is None:
            self._slot_logs = SlotLogs(self.live_log)
        return self._slot_logs

    @property
    def shown_slot(self) -> int:
        return self.slot_logs.shown

    @property
    def active_tab(self) -> str:
        return self.query_one("#tabs", TabbedContent).active

    # -- events in -------------------------------------------------------------------------

    def flush_events(self) -> None:
        """Apply what the pump collected since the last flush (a timer calls this)."""
        if not self.screen_stack or not self.screen.is_mounted or not self.query("#status"):
            return  # shutting down: the screens or the widgets are gone
        events = self.pump.drain()
        if events:
            self.apply_events(events)

    def apply_events(self, events: list[ev.Event]) -> None:
        """Fold a batch of events into the state, then redraw once."""
        notices: list[Notice] = []
        logs = self.slot_logs
        for event in events:
            if isinstance(event, ev.LogLines):
                logs.write(self.state.slot_of(event.iteration) or 1, event.iteration,
                           event.lines)
                continue
            if isinstance(event, ev.RunOpened):
                self._opened = True
            if isinstance(event, ev.EditedVersionInvalid):
                review = self.state.reviews.get(event.iteration)
                if review is not None:
                    self._decided.discard(review.key)  # the proposal waits again: keys back
            notices.extend(self.state.apply(event))
            if isinstance(event, ev.TrainingStarted):
                logs.started(event, self.state.slot_of(event.iteration) or 1)
            if isinstance(event, _TREE_EVENTS):
                self._tree_dirty = True
        if logs.shown > self.state.slot_count:  # a resumed run with fewer slots
            logs.show(1)
        self._decided &= {review.key for review in self.state.waiting_reviews}
        self._show_state()
        for notice in notices[-MAX_NOTICES_PER_BATCH:]:
            self.tell(notice)
        fresh = [review for review in self.state.waiting_reviews
                 if review.key > self._notified_review]
        if fresh:
            self._notified_review = max(review.key for review in fresh)
            numbers = [str(review.iteration) for review in fresh]
            what = (f"iteration {numbers[0]}: a proposal waits" if len(fresh) == 1 else
                    f"iterations {', '.join(numbers[:-1])} and {numbers[-1]}: proposals wait")
            self.tell(Notice(f"{what} for your review (press 2)", "warning", title="review",
                             bell=True))
        if self._tree_dirty:
            self.request_snapshot()
        self.update_bindings()

    def tell(self, notice: Notice) -> None:
        """Show a notice as a toast (and ring the bell when it asks to). Notices quote what
        runs, agents and humans wrote: plain text, never markup or terminal codes."""
        notice = replace(notice, message=strip_control(notice.message),
                         title=strip_control(notice.title))
        self.notices.append(notice)
        if notice.bell and self.settings.bell:
            self.bell()
        if self.settings.toasts:
            self.notify(notice.message, title=notice.title, severity=notice.severity,
                        timeout=8 if notice.severity != "information" else 4, markup=False)

    # -- the run folder, read in a worker --------------------------------------------------

    def request_snapshot(self) -> None:
        """Read the journal again soon (coalesced: one read at a time)."""
        self._tree_dirty = True
        if self._snapshot_running or not self.state.run_dir:
            return
        self._tree_dirty = False
        self._snapshot_running = True
        self._take_snapshot(Path(self.state.run_dir))

    @work(thread=True, name="snapshot", group="snapshot", exit_on_error=False)
    def _take_snapshot(self, run_dir: Path) -> None:
        from engine.attach import RunReader
        from tui.snapshot import take_snapshot

        try:
            if self.reader is None:
                self.reader = RunReader(run_dir)
            snapshot = take_snapshot(self.reader)
        finally:
            self.call_from_thread(self._snapshot_done)
        self.call_from_thread(self._show_snapshot, snapshot)

    def _snapshot_done(self) -> None:
        self._snapshot_running = False

    def _show_snapshot(self, snapshot: RunSnapshot) -> None:
        self.snapshot = snapshot
        self.tree_view.show(snapshot)
        self._update_documents()
        self._show_state()
        self.update_bindings()
        if self._tree_dirty:
            self.request_snapshot()

    def _update_documents(self) -> None:
        snapshot = self.snapshot
        if snapshot is None:
            return
        state = self.state
        if state.slot_count > 1:
            training = {slot: run.node_id for slot, run in sorted(state.slot_runs.items())}
        else:
            training = {1: state.node_id} if state.node_id is not None else {}
        if not training and snapshot.rows:
            training = {1: snapshot.rows[-1].node_id}
        self.logs_view.set_documents(run_documents(
            snapshot.info.run_dir, snapshot.info.instructions_path, training,
            several_slots=state.slot_count > 1))

    def check_files(self) -> None:
        """Re-read the files on show if they changed (a timer calls this unless turned off)."""
        tab = self.active_tab
        if tab == "logs":
            self._update_documents()
            self.logs_view.check()
        elif tab == "tree":
            self.tree_view.node_log.check()

    # -- drawing ---------------------------------------------------------------------------

    def _show_state(self) -> None:
        self.run_view.show(self.state, self.snapshot, self.shown_slot)
        self.review_view.show(self.state, self.snapshot, self.current_review() or self.state.review,
                              self._decision_sent(), frozenset(self._decided))
        self._show_status()

    def status_text(self) -> str:
        """The status line: iteration, block, phase (with several slots: how many are busy
        and how many proposals wait), clocks, cost, mode."""
        state, snapshot = self.state, self.snapshot
        total = state.total_iterations or (snapshot.info.iterations if snapshot else 0)
        parts = [f"run {state.run or '…'}", f"iteration {state.iteration}/{total}",
                 f"block {state.block}", str(state.phase)]
        if state.slot_count > 1:
            latest = max(state.in_flight, default=state.iteration)
            waiting = len(state.waiting_reviews)
            parts[1:] = [f"iteration {latest}/{total}", f"block {state.block}",
                         f"slots {state.busy_slots}/{state.slot_count} busy"]
            if state.finished is not None:
                parts.append(str(state.phase))
            elif waiting:
                parts.append(f"{waiting} waiting for review")
        if state.paused:
            parts.append(f"PAUSED: {state.paused}")
        if state.sandbox_missing:
            parts.append(f"SANDBOX: {len(state.sandbox_missing)} layer(s) missing")
        if self.settings.show_clock and snapshot is not None:
            end = self.settings.clock()
            parts.append(f"elapsed {_hms(end - snapshot.info.created_at)}")
            parts.append(f"ETA {_hms(snapshot.eta_s(total))}")
        if snapshot is not None:
            parts.append(f"agent ${snapshot.cost_usd:.2f}")
        parts.append("in-process" if self.source.live else "attached")
        return " · ".join(parts)

    def _show_status(self) -> None:
        found = self.query("#status")
        if not found:
            return  # shutting down: the widgets are gone
        status = found.first(Static)
        status.update(plain(self.status_text()))
        undecided = [review for review in self.state.waiting_reviews
                     if review.key not in self._decided]
        status.set_class(bool(undecided), "waiting")

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.tabbed_content.id == "tabs":
            self.update_bindings()
            if event.pane.id == "logs":
                self._update_documents()
                self.logs_view.check()
            elif event.pane.id == "tree":
                self.tree_view.focus_nodes()

    def on_tree_view_node_highlighted(self, event: TreeView.NodeHighlighted) -> None:
        self.update_bindings()

    # -- which keys apply ------------------------------------------------------------------

    def current_review(self) -> Review | None:
        """The waiting proposal the Review tab shows and its keys decide: the one the human
        picked, unless a decision went for it while another waits undecided; else the oldest
        one no decision was sent for; else the oldest."""
        waiting = self.state.waiting_reviews
        undecided = [review for review in waiting if review.key not in self._decided]
        picked = next((review for review in waiting
                       if review.iteration == self._picked_review), None)
        if picked is not None and (picked.key not in self._decided or not undecided):
            return picked
        return (undecided or waiting or [None])[0]

    def _decision_sent(self) -> bool:
        review = self.current_review()
        return review is not None and review.key in self._decided

    def _engine_listening(self) -> bool:
        """Whether a command can still reach an engine."""
        if self.state.finished is not None:
            return False
        return bool(getattr(self.source, "running", True))

    def _revert_target(self) -> int | None:
        snapshot = self.snapshot
        if snapshot is None:
            return None
        if self.active_tab == "tree":
            selected = self.tree_view.selected
            return selected if snapshot.revertable(selected) else None
        if self.active_tab == "review":
            return snapshot.latest_code_change()
        return None

    def action_applies(self, action: str) -> bool:
        """Whether `action` (a name, or a call such as "show_tab('run')") can run now."""
        name = action.split("(")[0]
        review = self.current_review()
        deciding = (review is not None and not self._decision_sent()
                    and self.active_tab == "review" and self._engine_listening())
        match name:
            case "accept" | "reject":
                return deciding
            case "edit":
                return deciding and review is not None and bool(review.proposal.edits)
            case "toggle_diff":
                return self.active_tab in ("review", "tree")
            case "toggle_tree_layout":
                return self.active_tab == "tree"
            case "revert":
                return self._engine_listening() and self._revert_target() is not None
            case "adopt_manual" | "ignore_manual":
                return (self.active_tab == "review" and bool(self.state.manual_edits)
                        and self._engine_listening())
            case "pause":
                return self._engine_listening() and self.state.paused is None
            case "resume":
                return self._engine_listening() and self.state.paused is not None
            case "previous_slot" | "next_slot":
                return self.active_tab == "run" and self.state.slot_count > 1
            case "show_slot":
                return self.state.slot_count > 1
            case "previous_review" | "next_review":
                return self.active_tab == "review" and len(self.state.waiting_reviews) > 1
            case "pick_review":
                return len(self.state.waiting_reviews) > 1
        return True

    def update_bindings(self) -> None:
        """Redraw the footer's keys, only when which keys apply has changed (a redraw
        rebuilds the footer, too costly for every batch of log lines)."""
        applies = tuple(self.action_applies(action) for action, _, _ in ACTIONS)
        if applies != self._applies:
            self._applies = applies
            self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in _GATED:
            return self.action_applies(action)
        return True

    # -- actions ---------------------------------------------------------------------------

    def send(self, command: ev.Command) -> bool:
        """Give the engine a command; False (and a notice) when it could not be sent."""
        try:
            self.source.send(command)
        except Exception as exc:  # a closed journal, a full disk: say so, keep the app
            self.tell(Notice(f"could not send {type(command).__name__}: {exc}", "error"))
            return False
        self.sent.append(command)
        return True

    def action_show_tab(self, tab: str) -> None:
        if tab in TABS:
            self.query_one("#tabs", TabbedContent).active = tab

    def action_previous_slot(self) -> None:
        self.action_show_slot(self.shown_slot - 1)

    def action_next_slot(self) -> None:
        self.action_show_slot(self.shown_slot + 1)

    def action_show_slot(self, slot: int) -> None:
        """Show slot `slot`'s run and live log (wrapping around at either end)."""
        count = self.state.slot_count
        self.slot_logs.show((slot - 1) % count + 1)
        self.action_show_tab("run")
        self._show_state()

    def action_previous_review(self) -> None:
        self._step_review(-1)

    def action_next_review(self) -> None:
        self._step_review(1)

    def _step_review(self, step: int) -> None:
        waiting = self.state.waiting_reviews
        current = self.current_review()
        if not waiting or current is None:
            return
        index = [review.key for review in waiting].index(current.key)
        self.action_pick_review(waiting[(index + step) % len(waiting)].iteration)

    def action_pick_review(self, iteration: int) -> None:
        """Show (and let the keys decide) the proposal of `iteration` that waits."""
        self._picked_review = iteration
        self.action_show_tab("review")
        self._show_state()
        self.update_bindings()

    def _still_waiting(self, review: Review) -> bool:
        """Whether `review` still waits (says so when it does not)."""
        if any(current.key == review.key for current in self.state.waiting_reviews):
            return True
        self.tell(Notice(f"the proposal of iteration {review.iteration} you were deciding on "
                         "no longer waits: nothing sent", "warning"))
        return False

    def _decide(self, review: Review, command: ev.Command, done: str) -> None:
        """Send a decision about `review` (the command names its proposal_id), once."""
        if self._still_waiting(review) and self.send(command):
            self._decided.add(review.key)
            self.tell(Notice(f"iteration {review.iteration}: {done}"))
            self._show_state()
            self.update_bindings()

    def action_accept(self) -> None:
        review = self.current_review()
        if review is not None:
            self._decide(review, ev.Approve(proposal_id=review.proposal_id), "accepted")

    def action_reject(self) -> None:
        review = self.current_review()
        if review is None:
            return

        def rejected(reason: str | None) -> None:
            if reason:
                self._decide(review, ev.Reject(proposal_id=review.proposal_id, reason=reason),
                             "rejected")

        self.push_screen(ReasonScreen(f"Why reject the proposal of iteration "
                                      f"{review.iteration}? The agent reads this.",
                                      "e.g. too many changes at once"), rejected)

    def action_edit(self) -> None:
        self._edit_proposal()

    @work(name="edit", group="edit", exclusive=True, exit_on_error=False)
    async def _edit_proposal(self) -> None:
        from engine.review import find_review
        from tui.editor import EditorError, edit_files

        review = self.current_review()
        if review is None or self.reader is None:
            return
        journaled = await asyncio.to_thread(find_review, self.reader.journal, review.proposal_id)
        if journaled is None or not journaled.texts:
            self.tell(Notice("cannot edit this proposal: its review names no code", "error"))
            return
        proposed = dict(journaled.texts)  # exactly what the engine prepared for review
        try:
            edited = edit_files(proposed, self._run_editor)
        except EditorError as exc:
            self.tell(Notice(str(exc), "error", title="editor"))
            return
        if edited == proposed:
            self.tell(Notice("no change made: nothing sent (a accepts the proposal as it is)"))
            return
        self._decide(review, ev.ApproveEdited(proposal_id=review.proposal_id, files=edited),
                     "your edited version was sent")

    def _run_editor(self, argv: list[str]) -> int:
        """Run the editor with the terminal handed over to it."""
        try:
            with self.suspend():
                return subprocess.run(argv, check=False).returncode
        except SuspendNotSupported:  # headless (tests): no terminal to hand over
            return subprocess.run(argv, check=False, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                                  ).returncode

    def action_toggle_tree_layout(self) -> None:
        self.tree_view.action_toggle_layout()

    def action_toggle_diff(self) -> None:
        self.side_by_side = not self.side_by_side
        self.review_view.diff_view.side_by_side = self.side_by_side
        self.tree_view.diff_view.side_by_side = self.side_by_side

    def action_revert(self) -> None:
        target = self._revert_target()
        snapshot = self.snapshot
        if target is None or snapshot is None:
            return
        parent = snapshot.nodes[target].parent_id
        before = "the base code" if parent is None else f"node {parent}'s code"

        def confirmed(yes: bool | None) -> None:
            if yes and self.send(ev.Revert(node_id=target)):
                self.tell(Notice(f"revert of node {target} requested"))

        self.push_screen(ConfirmScreen(
            f"Revert node {target}? A new node runs with {before}; node {target} and its "
            "history stay in the tree.", "Revert"), confirmed)

    def _first_manual_edit(self) -> str | None:
        return next(iter(self.state.manual_edits), None)

    def action_adopt_manual(self) -> None:
        path = self._first_manual_edit()
        if path is not None and self.send(ev.AdoptManualEdit(path=path)):
            self.tell(Notice(f"adopting the manual edit of {path}"))

    def action_ignore_manual(self) -> None:
        path = self._first_manual_edit()
        if path is None:
            return

        def confirmed(yes: bool | None) -> None:
            if yes and self.send(ev.IgnoreManualEdit(path=path)):
                self.tell(Notice(f"ignoring the manual edit of {path}"))

        self.push_screen(ConfirmScreen(
            f"Ignore the manual edit of {path}? Runs keep using the node's own code.",
            "Ignore"), confirmed)

    def action_pause(self) -> None:
        self.send(ev.Pause(reason="paused from the TUI"))

    def action_resume(self) -> None:
        self.send(ev.ResumeRun())

    def action_help(self) -> None:
        self.push_screen(HelpScreen(help_text(self)))

    async def action_quit(self) -> None:
        if not (self.source.live and getattr(self.source, "running", False)):
            self.exit()
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self._stop_and_exit()

        self.push_screen(ConfirmScreen(
            f"Quit and stop run {self.state.run}? The training is stopped; "
            f"`proctor resume {self.state.run}` continues it later.", "Stop and quit"),
            confirmed)

    @work(name="stop", group="stop", exclusive=True, exit_on_error=False)
    async def _stop_and_exit(self) -> None:
        self.send(ev.Stop(reason="stopped from the TUI"))
        self.tell(Notice("stopping the run…"))
        worker = self._source_worker
        if worker is not None:
            try:
                await asyncio.wait_for(worker.wait(), STOP_WAIT_S)
            except (TimeoutError, WorkerFailed):
                worker.cancel()
        self.exit()

    # -- the one place worker failures land ------------------------------------------------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if event.state == WorkerState.SUCCESS and worker.group == "source":
            self.update_bindings()
        if event.state != WorkerState.ERROR:
            return
        error = worker.error
        message = str(error) if isinstance(error, SourceError) else \
            f"{type(error).__name__}: {error}"
        if worker.group == "source":
            if not self._opened:
                self.failure = message
                self.exit(return_code=2)
                return
            self.state.last_error = message
            self.tell(Notice(f"the engine stopped with an error: {message}", "error",
                             title="engine"))
            self.update_bindings()
        elif worker.group == "snapshot":
            self._snapshot_running = False
            self.tell(Notice(f"cannot read the run folder: {message}", "error"))
        else:
            self.tell(Notice(f"{worker.name} failed: {message}", "error"))


def help_text(app: ProctorApp) -> str:
    """The keys and the actions they run, as markdown."""
    keys = {binding.action: binding.key for binding in app.BINDINGS
            if isinstance(binding, Binding)}
    lines = ["# proctor keys", "", "| key | action | |", "|---|---|---|"]
    for action, title, help_line in ACTIONS:
        key = keys.get(action, "").replace("question_mark", "?").replace(
            "left_square_bracket", "[").replace("right_square_bracket", "]")
        lines.append(f"| `{key}` | {title} | {help_line} |")
    lines += ["", "`ctrl+p` opens the command palette (every action that applies now). "
              "In a log, `f` or `End` follows new lines again; scrolling up stops following.",
              "", "In the tree tab, `t` switches between the tree and the flat table, and "
              "`space` folds or unfolds a branch; the path to the best node is green.",
              "", "With several slots, `[` and `]` switch the slot the run tab shows, and "
              "the proposal the review tab shows when several wait.",
              "", "Keys that do not apply now are hidden from the footer."]
    return "\n".join(lines)


def build_app(source: EventSource, settings: TuiSettings | None = None) -> ProctorApp:
    """The app for the CLI and the tests alike."""
    return ProctorApp(source, settings)


def attached_app(run_dir: Path, settings: TuiSettings | None = None) -> ProctorApp:
    """The app on a run another process drives (`proctor attach`)."""
    from tui.source import AttachedSource

    settings = settings or TuiSettings.from_env()
    return build_app(AttachedSource(run_dir, settings.journal_poll_s), settings)


def live_app(open_engine, settings: TuiSettings | None = None) -> ProctorApp:
    """The app with the engine inside it (`proctor run`); `open_engine(publish)` builds the
    engine and raises SourceError for what the user can fix."""
    from tui.source import EngineSource

    return build_app(EngineSource(open_engine), settings)

