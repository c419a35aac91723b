"""The Run view: what the current iteration is doing, the live training log, R2 so far.

With several slots a bar lists them (the shown one marked), and the details, the progress
and the live log are the shown slot's; with one slot there is no slot chrome at all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Static

from engine.progress import SIMULATION
from tui.state import RunState, SlotRun
from tui.widgets.best_curve import BestCurve
from tui.widgets.line_view import LineView
from tui.widgets.live_log import LiveLog
from tui.widgets.plain import plain

if TYPE_CHECKING:
    from tui.snapshot import RunSnapshot


def format_r2(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def progress_label(state: RunState | SlotRun) -> Text:
    """What the progress bar counts: `simulating 40/200 frames`, `training 300/2000 steps`."""
    if not state.steps:
        return Text("training")
    if state.progress_phase == SIMULATION:
        return Text(f"simulating {state.step}/{state.steps} frames")
    return Text(f"training {state.step}/{state.steps} steps")


def _node_lines(node_id: int | None, parent_id: int | None, strategy: str | None,
                mutation: str | None, hypothesis: str | None) -> Text:
    """`node 7 ← parent 3 · strategy ...`, then its mutation and hypothesis (agents' text:
    plain, never markup)."""
    parent = "root" if parent_id is None else str(parent_id)
    lines = Text(f"node {node_id if node_id is not None else '–'} ← parent {parent} "
                 "· strategy ")
    lines.append_text(plain(strategy or "–"))
    lines.append("\nmutation   ", "dim")
    lines.append_text(plain(mutation or "–"))
    lines.append("\nhypothesis ", "dim")
    lines.append_text(plain(hypothesis or "–"))
    lines.append("\n")
    return lines


def slot_role(snapshot: RunSnapshot | None, slot: int) -> str | None:
    """What `slot` is asked for (`exploration.slot_roles`, cycled over the slots as the
    engine assigns them); None when the config names no roles."""
    return snapshot.info.config.exploration.slot_role(slot) if snapshot is not None else None


def slot_summary(state: RunState, snapshot: RunSnapshot | None, slot: int) -> str:
    """A few words on a slot for the slot bar: `it 7 training 40%`, `it 9 waiting for
    review`, `it 8 done`."""
    run = state.slot_runs.get(slot)
    held = state.held_before_training(slot, _unfinished(snapshot))
    if held is not None:
        return f"it {held} {state.before_training(held)}"
    if run is None:
        return "no run yet"
    if not run.running:
        return f"it {run.iteration} {run.status}"
    what = "simulating" if run.progress_phase == SIMULATION else "training"
    share = f" {100 * min(run.step, run.steps) // run.steps}%" if run.steps else ""
    return f"it {run.iteration} {what}{share}"


def slot_bar(state: RunState, snapshot: RunSnapshot | None, shown: int) -> Text:
    """Every slot in one wrapping line, the shown one highlighted."""
    bar = Text.assemble((f"slots {state.busy_slots}/{state.slot_count} busy", "bold"),
                        ("  [ ] switch  ", "dim"))
    for slot in range(1, state.slot_count + 1):
        label = f" {slot}: {slot_summary(state, snapshot, slot)} "
        bar.append(label, "reverse bold" if slot == shown else "")
        bar.append(" ")
    return bar


class RunView(Vertical):
    """Iteration details and R2 chart on top, the training progress, then the live log."""

    DEFAULT_CSS = """
    RunView #slot-bar { height: auto; padding: 0 1; background: $panel; display: none; }
    RunView #slot-bar.shown { display: block; }
    RunView #run-top { height: 7; }
    RunView #run-info { width: 1fr; padding: 0 1; }
    RunView #run-chart { width: 42; padding: 0 1; border-left: solid $primary-darken-2; }
    RunView #r2-chart { height: 1fr; }
    RunView #progress-row { height: 1; padding: 0 1; }
    RunView #progress-row Label { width: auto; margin-right: 1; }
    RunView #train-progress { width: 1fr; }
    RunView #train-progress Bar { width: 1fr; }
    RunView #live-log { height: 1fr; border-top: solid $primary-darken-2; }
    RunView #new-lines { dock: bottom; height: 1; background: $warning; color: $text;
                         display: none; padding: 0 1; }
    RunView #new-lines.shown { display: block; }
    """

    def __init__(self, max_lines: int, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.max_lines = max_lines

    def compose(self) -> ComposeResult:
        yield Static("", id="slot-bar")
        with Horizontal(id="run-top"):
            yield Static(id="run-info")
            with Vertical(id="run-chart"):
                yield Label("R² (•) · best so far (line)", id="chart-title")
                yield BestCurve(id="r2-chart")
        with Horizontal(id="progress-row"):
            yield Label("training", id="progress-label")
            yield ProgressBar(total=1, show_eta=False, id="train-progress")
        yield LiveLog(self.max_lines, id="live-log")
        yield Static("", id="new-lines")

    @property
    def live_log(self) -> LiveLog:
        return self.query_one(LiveLog)

    def show(self, state: RunState, snapshot: RunSnapshot | None, slot: int = 1) -> None:
        """Redraw from the state (cheap; called once per batch of events); with several
        slots, `slot`'s run is the one detailed."""
        several = state.slot_count > 1
        bar = self.query_one("#slot-bar", Static)
        bar.set_class(several, "shown")
        if several:
            bar.update(slot_bar(state, snapshot, slot))
            self._show_slot(state, snapshot, slot)
        else:
            self._show_iteration(state, snapshot)
        self._show_chart(snapshot)

    def _show_iteration(self, state: RunState, snapshot: RunSnapshot | None) -> None:
        """The one slot's iteration, as the latest events tell it."""
        total = state.total_iterations or (snapshot.info.iterations if snapshot else 0)
        lines = Text()
        lines.append(f"iteration {state.iteration}/{total}", "bold")
        lines.append(f" · block {state.block} · {state.phase}\n")
        lines.append_text(_node_lines(state.node_id, state.parent_id, state.strategy,
                                      state.mutation, state.hypothesis))
        lines.append_text(_best(state, snapshot, state.last_r2))
        self.query_one("#run-info", Static).update(lines)
        self._show_progress(state)

    def _show_slot(self, state: RunState, snapshot: RunSnapshot | None, slot: int) -> None:
        """Slot `slot`: where it runs, its role, and its latest run."""
        run = state.slot_runs.get(slot)
        where = run.where if run is not None and run.where else (
            state.slots[slot - 1] if slot <= len(state.slots) else f"slot {slot}")
        role = slot_role(snapshot, slot)
        lines = Text.assemble((f"slot {slot}/{state.slot_count}", "bold"), " · ", plain(where))
        if role is not None:
            lines.append(f" · role {role}")
        lines.append("\n")
        held = state.held_before_training(slot, _unfinished(snapshot))
        if held is not None:
            lines.append_text(_held(state, snapshot, held))
        elif run is None:
            lines.append("no run started in this slot yet\n", "dim")
        else:
            total = state.total_iterations or (snapshot.info.iterations if snapshot else 0)
            lines.append(f"iteration {run.iteration}/{total}", "bold")
            lines.append(" · ")
            lines.append_text(progress_label(run) if run.running else
                              Text(f"node {run.node_id} {run.status}"))
            lines.append("\n")
            lines.append_text(_node_lines(run.node_id, run.parent_id, run.strategy,
                                          run.mutation, run.hypothesis))
        lines.append_text(_best(state, snapshot, run.r2 if run is not None else None))
        self.query_one("#run-info", Static).update(lines)
        shown = run if run is not None and held is None else None
        self._show_progress(shown or SlotRun(slot, where, 0, 0, None, ""))

    def _show_chart(self, snapshot: RunSnapshot | None) -> None:
        self.query_one("#r2-chart", BestCurve).show(snapshot.nodes.values() if snapshot else ())

    def _show_progress(self, state: RunState | SlotRun) -> None:
        bar = self.query_one("#train-progress", ProgressBar)
        bar.update(total=max(state.steps, 1), progress=min(state.step, max(state.steps, 1)))
        self.query_one("#progress-label", Label).update(progress_label(state))

    def on_line_view_follow_changed(self, event: LineView.FollowChanged) -> None:
        marker = self.query_one("#new-lines", Static)
        shown = not event.follow and event.unseen > 0
        marker.set_class(shown, "shown")
        if shown:
            marker.update(f"▼ {event.unseen} new lines — press f or End to follow")


def _best(state: RunState, snapshot: RunSnapshot | None, last: float | None) -> Text:
    """`best R²  0.9312 (node 5) · last 0.9100`."""
    best_r2, best_id = state.best_r2, None
    if snapshot is not None and snapshot.best_r2 is not None:
        best_r2, best_id = snapshot.best_r2, snapshot.best_id
    line = Text()
    line.append("best R²    ", "dim")
    line.append(format_r2(best_r2), "bold green")
    if best_id is not None:
        line.append(f" (node {best_id})")
    line.append(f" · last {format_r2(last)}")
    return line


def _unfinished(snapshot: RunSnapshot | None) -> dict[int, int]:
    return snapshot.unfinished_slots if snapshot is not None else {}


def _held(state: RunState, snapshot: RunSnapshot | None, iteration: int) -> Text:
    """An iteration before its run: what it does, and its proposal once there is one."""
    total = state.total_iterations or (snapshot.info.iterations if snapshot else 0)
    lines = Text.assemble((f"iteration {iteration}/{total}", "bold"),
                          f" · {state.before_training(iteration)}\n")
    review = state.reviews.get(iteration)
    if review is None:
        return lines
    proposal = review.proposal
    parent = "root" if proposal.parent_id is None else str(proposal.parent_id)
    lines.append(f"node {iteration} ← parent {parent} · strategy ")
    lines.append_text(plain(str(proposal.strategy)))
    lines.append("\nmutation   ", "dim")
    lines.append_text(plain(proposal.mutation or review.config_diff.replace("\n", "; ")
                            or "–"))
    lines.append("\nhypothesis ", "dim")
    lines.append_text(plain(proposal.hypothesis or "–"))
    lines.append("\n")
    return lines
