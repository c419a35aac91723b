"""The Run view: what the current iteration is doing, the live training log, R2 so far."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Sparkline, Static

from engine.progress import SIMULATION
from tui.state import RunState
from tui.widgets.line_view import LineView
from tui.widgets.live_log import LiveLog
from tui.widgets.plain import plain

if TYPE_CHECKING:
    from tui.snapshot import RunSnapshot


def format_r2(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def progress_label(state: RunState) -> Text:
    """What the progress bar counts: `simulating 40/200 frames`, `training 300/2000 steps`."""
    if not state.steps:
        return Text("training")
    if state.progress_phase == SIMULATION:
        return Text(f"simulating {state.step}/{state.steps} frames")
    return Text(f"training {state.step}/{state.steps} steps")


class RunView(Vertical):
    """Iteration details and R2 chart on top, the training progress, then the live log."""

    DEFAULT_CSS = """
    RunView #run-top { height: 7; }
    RunView #run-info { width: 1fr; padding: 0 1; }
    RunView #run-chart { width: 42; padding: 0 1; border-left: solid $primary-darken-2; }
    RunView #r2-chart { height: 3; }
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
        with Horizontal(id="run-top"):
            yield Static(id="run-info")
            with Vertical(id="run-chart"):
                yield Label("R² per iteration", id="chart-title")
                yield Sparkline([], id="r2-chart")
                yield Label("", id="chart-range")
        with Horizontal(id="progress-row"):
            yield Label("training", id="progress-label")
            yield ProgressBar(total=1, show_eta=False, id="train-progress")
        yield LiveLog(self.max_lines, id="live-log")
        yield Static("", id="new-lines")

    @property
    def live_log(self) -> LiveLog:
        return self.query_one(LiveLog)

    def show(self, state: RunState, snapshot: RunSnapshot | None) -> None:
        """Redraw from the state (cheap; called once per batch of events)."""
        total = state.total_iterations or (snapshot.info.iterations if snapshot else 0)
        lines = Text()
        lines.append(f"iteration {state.iteration}/{total}", "bold")
        lines.append(f" · block {state.block} · {state.phase}\n")
        parent = "root" if state.parent_id is None else str(state.parent_id)
        node = f"node {state.node_id}" if state.node_id is not None else "node –"
        lines.append(f"{node} ← parent {parent} · strategy ")
        lines.append_text(plain(state.strategy or "–"))
        lines.append("\nmutation   ", "dim")
        lines.append_text(plain(state.mutation or "–"))
        lines.append("\nhypothesis ", "dim")
        lines.append_text(plain(state.hypothesis or "–"))
        lines.append("\n")
        best_r2, best_id = state.best_r2, None
        if snapshot is not None and snapshot.best_r2 is not None:
            best_r2, best_id = snapshot.best_r2, snapshot.best_id
        lines.append("best R²    ", "dim")
        lines.append(format_r2(best_r2), "bold green")
        if best_id is not None:
            lines.append(f" (node {best_id})")
        lines.append(f" · last {format_r2(state.last_r2)}")
        self.query_one("#run-info", Static).update(lines)
        series = list(snapshot.r2_series) if snapshot else []
        self.query_one("#r2-chart", Sparkline).data = series
        if series:
            summary = f"{len(series)} runs · min {min(series):.3f} · max {max(series):.3f}"
        else:
            summary = "no finished runs yet"
        self.query_one("#chart-range", Label).update(summary)
        bar = self.query_one("#train-progress", ProgressBar)
        bar.update(total=max(state.steps, 1), progress=min(state.step, max(state.steps, 1)))
        self.query_one("#progress-label", Label).update(progress_label(state))

    def on_line_view_follow_changed(self, event: LineView.FollowChanged) -> None:
        marker = self.query_one("#new-lines", Static)
        shown = not event.follow and event.unseen > 0
        marker.set_class(shown, "shown")
        if shown:
            marker.update(f"▼ {event.unseen} new lines — press f or End to follow")
