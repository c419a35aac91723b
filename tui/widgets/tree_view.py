"""The Tree view: every node in a table; the highlighted one's config diff, code diff,
metrics and training log beside it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Static, TabbedContent, TabPane

from engine.logs import numbered
from engine.tree import NodeStatus, ScoreRow
from tui.widgets.diff_view import DiffView
from tui.widgets.file_log import FileLog

if TYPE_CHECKING:
    from tui.snapshot import RunSnapshot

COLUMNS = ("node", "parent", "R²", "score", "visits", "code", "status", "mutation")
_STATUS_STYLE = {
    NodeStatus.DONE: "green", NodeStatus.FAILED: "red", NodeStatus.DIVERGED: "magenta",
    NodeStatus.RUNNING: "yellow", NodeStatus.PENDING: "dim",
}


def _cells(row: ScoreRow, best_id: int | None) -> tuple[object, ...]:
    r2 = "nan" if not math.isfinite(row.r2) else f"{row.r2:.4f}"
    node = Text(str(row.node_id), style="bold green" if row.node_id == best_id else "")
    return (
        node, "root" if row.parent_id is None else str(row.parent_id), r2,
        f"{row.score:.3f}", str(row.visits), "[CODE]" if row.code_changed else "",
        Text(str(row.status), style=_STATUS_STYLE.get(row.status, "")), row.mutation,
    )


def _read(path: Path, limit: int = 256 * 1024) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(limit)
    except OSError:
        return ""


class TreeView(Horizontal):
    """The node table and the highlighted node's details."""

    DEFAULT_CSS = """
    TreeView #node-table { width: 3fr; height: 1fr; }
    TreeView #node-detail { width: 2fr; border-left: solid $primary-darken-2; }
    TreeView #node-title { height: auto; padding: 0 1; text-style: bold; }
    TreeView TabPane { padding: 0; }
    TreeView .pane-scroll { height: 1fr; padding: 0 1; }
    TreeView #node-log { height: 1fr; }
    """

    class NodeHighlighted(Message):
        """The user moved to another node (the app re-checks which keys apply)."""

        def __init__(self, node_id: int | None) -> None:
            super().__init__()
            self.node_id = node_id

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.selected: int | None = None
        self._snapshot: RunSnapshot | None = None
        self._shown: dict[str, tuple[ScoreRow, bool]] = {}  # what each table row shows
        self._columns: list = []

    def compose(self) -> ComposeResult:
        table: DataTable = DataTable(id="node-table", cursor_type="row", zebra_stripes=True)
        self._columns = table.add_columns(*COLUMNS)
        yield table
        with Vertical(id="node-detail"):
            yield Static("Select a node.", id="node-title")
            with TabbedContent(id="node-tabs"):
                with TabPane("Config", id="node-config-pane"), \
                        VerticalScroll(classes="pane-scroll"):
                    yield Static("", id="node-config")
                with TabPane("Code", id="node-code-pane"), \
                        VerticalScroll(classes="pane-scroll"):
                    yield DiffView("no code change at this node", id="node-diff")
                with TabPane("Metrics", id="node-metrics-pane"), \
                        VerticalScroll(classes="pane-scroll"):
                    yield Static("", id="node-metrics")
                with TabPane("Log", id="node-log-pane"):
                    yield FileLog(placeholder="no training log", id="node-log")

    @property
    def diff_view(self) -> DiffView:
        return self.query_one("#node-diff", DiffView)

    @property
    def node_log(self) -> FileLog:
        return self.query_one("#node-log", FileLog)

    def show(self, snapshot: RunSnapshot) -> None:
        """Bring the table up to date with a snapshot (changed cells only; the cursor stays)."""
        self._snapshot = snapshot
        table = self.query_one("#node-table", DataTable)
        for row in snapshot.rows:
            key = str(row.node_id)
            shown = (row, row.node_id == snapshot.best_id)
            previous = self._shown.get(key)
            if previous == shown:
                continue
            cells = _cells(row, snapshot.best_id)
            if previous is None:
                table.add_row(*cells, key=key)
            else:
                for column, value in zip(self._columns, cells, strict=True):
                    table.update_cell(key, column, value, update_width=True)
            self._shown[key] = shown
        if self.selected is not None:
            self._show_node(self.selected, refresh_only=True)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if event.row_key.value is None:
            return
        node_id = int(event.row_key.value)
        if node_id != self.selected:
            self._show_node(node_id)

    def _show_node(self, node_id: int, refresh_only: bool = False) -> None:
        snapshot = self._snapshot
        if snapshot is None or node_id not in snapshot.nodes:
            return
        changed = node_id != self.selected
        self.selected = node_id
        node = snapshot.nodes[node_id]
        folder = snapshot.info.run_dir / "nodes" / numbered(node_id)
        parent = "root" if node.parent_id is None else f"node {node.parent_id}"
        self.query_one("#node-title", Static).update(Text.assemble(
            f"Node {node_id}", (f"  ← {parent} · {node.status} · {node.strategy or '–'}",
                                "dim")))
        config_diff = _read(folder / "config.diff").strip() or "same config as its parent"
        self.query_one("#node-config", Static).update(Text(config_diff))
        self.diff_view.diff = _read(folder / "change.diff")
        self.query_one("#node-metrics", Static).update(self._metrics_text(folder, node.metrics))
        if changed:
            log = folder / "training.log"
            self.node_log.open(log if log.exists() else None)
        else:
            self.node_log.check()
        if not refresh_only:
            self.post_message(self.NodeHighlighted(node_id))

    @staticmethod
    def _metrics_text(folder: Path, metrics: dict[str, float]) -> Text:
        text = Text()
        record: dict = {}
        try:
            record = json.loads(_read(folder / "metrics.json") or "{}")
        except ValueError:
            record = {}
        values = record.get("metrics") or metrics
        if not values:
            return Text("no metrics (yet)", style="dim")
        for name, value in values.items():
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            text.append(f"{name:<18}", "dim")
            text.append(shown + "\n")
        if record.get("error"):
            text.append("\nerror\n", "bold red")
            text.append(str(record["error"]))
        return text
