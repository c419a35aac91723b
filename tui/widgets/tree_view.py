"""The Tree view: the nodes as a tree (each under its parent, the path to the best node
highlighted) or, one key away, as a flat table; the highlighted node's config diff, code
diff, metrics and training log beside it, and the run's best-so-far curve.

A snapshot arrives whenever the tree changed (never per log line); only the rows whose
shown values changed are redrawn, and only in the layout on screen (the other catches up
when it is shown)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import ContentSwitcher, DataTable, Static, TabbedContent, TabPane, Tree
from textual.widgets.tree import TreeNode

from engine.logs import strip_control
from engine.paths import RunPaths
from engine.tree import NodeStatus, ScoreRow
from tui.widgets.best_curve import BestCurve
from tui.widgets.diff_view import DiffView
from tui.widgets.file_log import FileLog
from tui.widgets.plain import plain

if TYPE_CHECKING:
    from tui.snapshot import RunSnapshot

COLUMNS = ("node", "parent", "R²", "score", "visits", "code", "status", "mutation")
CODE_TAG = "[CODE]"
_VERDICT_STYLE = {"helped": "bold green", "hurt": "bold red", "no effect": "yellow"}
TREE, TABLE = "node-tree", "node-table"
# Textual lays a tree out recursively, one frame per level: a long chain of nodes needs room.
RECURSION_HEADROOM = 300
_STATUS_STYLE = {
    NodeStatus.DONE: "green", NodeStatus.FAILED: "red", NodeStatus.DIVERGED: "magenta",
    NodeStatus.RUNNING: "yellow", NodeStatus.PENDING: "dim",
}


def _r2(row: ScoreRow) -> str:
    return "nan" if not math.isfinite(row.r2) else f"{row.r2:.4f}"


def _mutation(row: ScoreRow) -> Text:
    """The agent's label on one line, as plain text."""
    return plain(" ".join(strip_control(row.mutation).split()))


def _cells(row: ScoreRow, best_id: int | None) -> tuple[object, ...]:
    node = Text(str(row.node_id), style="bold green" if row.node_id == best_id else "")
    return (
        node, "root" if row.parent_id is None else str(row.parent_id), _r2(row),
        f"{row.score:.3f}", str(row.visits), Text(CODE_TAG if row.code_changed else ""),
        Text(str(row.status), style=_STATUS_STYLE.get(row.status, "")), _mutation(row),
    )


def node_label(row: ScoreRow, on_best_path: bool, best: bool, ab: str | None = None) -> Text:
    """One line of the tree: `3 ★ best  R² 0.6113  done  [CODE] A/B helped  <mutation>`."""
    label = Text()
    label.append(str(row.node_id), "bold green" if on_best_path else "bold")
    if best:
        label.append(" ★ best", "bold green")
    label.append(f"  R² {_r2(row)}", "green" if on_best_path else "")
    label.append(f"  {row.status}", _STATUS_STYLE.get(row.status, ""))
    if row.code_changed:
        label.append(f"  {CODE_TAG}", "bold magenta")
    if ab is not None:
        label.append(f" A/B {ab}", _VERDICT_STYLE.get(ab, ""))
    mutation = _mutation(row)
    if mutation:
        label.append("  ")
        label.append_text(mutation)
    return label


def best_path(snapshot: RunSnapshot) -> set[int]:
    """The ids from a root down to the best node (empty before a node is done)."""
    path: set[int] = set()
    node_id = snapshot.best_id
    while node_id is not None and node_id not in path and node_id in snapshot.nodes:
        path.add(node_id)
        node_id = snapshot.nodes[node_id].parent_id
    return path


def _read(path: Path, limit: int = 256 * 1024) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(limit)
    except OSError:
        return ""


class TreeView(Horizontal):
    """The nodes (tree or table) and the highlighted node's details."""

    DEFAULT_CSS = """
    TreeView #node-list { width: 3fr; height: 1fr; }
    TreeView #node-tree, TreeView #node-table { height: 1fr; }
    TreeView #node-detail { width: 2fr; border-left: solid $primary-darken-2; }
    TreeView #node-title { height: auto; padding: 0 1; text-style: bold; }
    TreeView TabPane { padding: 0; }
    TreeView .pane-scroll { height: 1fr; padding: 0 1; }
    TreeView #node-log { height: 1fr; }
    TreeView #run-curve { height: 1fr; padding: 0 1; }
    """
    BINDINGS = [Binding("t", "toggle_layout", "Tree/table", id="proctor.tree.layout")]

    class NodeHighlighted(Message):
        """The user moved to another node (the app re-checks which keys apply)."""

        def __init__(self, node_id: int | None) -> None:
            super().__init__()
            self.node_id = node_id

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.selected: int | None = None
        self._snapshot: RunSnapshot | None = None
        self._in_table: dict[str, tuple[ScoreRow, bool]] = {}  # what each table row shows
        self._in_tree: dict[int, tuple] = {}  # what each tree line shows
        self._tree_nodes: dict[int, TreeNode[int]] = {}
        self._depth: dict[int, int] = {}
        self._columns: list = []

    def compose(self) -> ComposeResult:
        with ContentSwitcher(initial=TREE, id="node-list"):
            tree: Tree[int] = Tree("nodes", id=TREE)
            tree.show_root = False
            tree.guide_depth = 3
            yield tree
            table: DataTable = DataTable(id=TABLE, cursor_type="row", zebra_stripes=True)
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
                with TabPane("Curve", id="run-curve-pane"):
                    yield BestCurve(id="run-curve")  # the run's, whichever node is shown

    @property
    def diff_view(self) -> DiffView:
        return self.query_one("#node-diff", DiffView)

    @property
    def node_log(self) -> FileLog:
        return self.query_one("#node-log", FileLog)

    @property
    def layout_shown(self) -> str:
        """"tree" or "table"."""
        return "tree" if self.query_one(ContentSwitcher).current == TREE else "table"

    def focus_nodes(self) -> None:
        """Put the keyboard on the node list shown (arrows move, `t` switches layout)."""
        self.query_one(f"#{self.query_one(ContentSwitcher).current}").focus()

    # -- bringing the lists up to date -----------------------------------------------------

    def show(self, snapshot: RunSnapshot) -> None:
        """Bring the shown list up to date with a snapshot (changed rows only; the cursor
        stays)."""
        self._snapshot = snapshot
        self.query_one("#run-curve", BestCurve).show(snapshot.nodes.values())
        if self.layout_shown == "tree":
            self._sync_tree(snapshot)
        else:
            self._sync_table(snapshot)
        if self.selected is not None:
            self._show_node(self.selected, refresh_only=True)

    def _sync_table(self, snapshot: RunSnapshot) -> None:
        table = self.query_one(DataTable)
        for row in snapshot.rows:
            key = str(row.node_id)
            shown = (row, row.node_id == snapshot.best_id)
            previous = self._in_table.get(key)
            if previous == shown:
                continue
            cells = _cells(row, snapshot.best_id)
            if previous is None:
                table.add_row(*cells, key=key)
            else:
                for column, value in zip(self._columns, cells, strict=True):
                    table.update_cell(key, column, value, update_width=True)
            self._in_table[key] = shown

    def _sync_tree(self, snapshot: RunSnapshot) -> None:
        tree: Tree[int] = self.query_one(Tree)
        path = best_path(snapshot)
        for row in snapshot.rows:  # by id: a parent comes before its children
            on_path = row.node_id in path
            shown = (_r2(row), row.status, row.code_changed, row.mutation, on_path,
                     row.node_id == snapshot.best_id)
            if self._in_tree.get(row.node_id) == shown:
                continue
            tested = snapshot.ab_tests.get(row.node_id)
            label = node_label(row, on_path, row.node_id == snapshot.best_id,
                               tested.verdict if tested is not None else None)
            node = self._tree_nodes.get(row.node_id)
            if node is None:
                self._add_to_tree(tree, row, label)
            else:
                node.set_label(label)
            self._in_tree[row.node_id] = shown
        if self.selected is None and self._tree_nodes:
            self._move_tree_cursor(min(self._tree_nodes))

    def _add_to_tree(self, tree: Tree[int], row: ScoreRow, label: Text) -> None:
        parent = self._tree_nodes.get(row.parent_id) if row.parent_id is not None else None
        if parent is not None and not parent.allow_expand:
            parent.allow_expand = True  # its first child: it folds now
            parent.expand()
        depth = self._depth.get(row.parent_id, 0) + 1 if parent is not None else 1
        self._depth[row.node_id] = depth
        if sys.getrecursionlimit() < depth + RECURSION_HEADROOM:
            sys.setrecursionlimit(depth + RECURSION_HEADROOM)
        self._tree_nodes[row.node_id] = (parent or tree.root).add(
            label, data=row.node_id, expand=True, allow_expand=False)

    # -- the cursor ------------------------------------------------------------------------

    def select(self, node_id: int) -> None:
        """Move the cursor of the list shown to `node_id` (its details follow)."""
        if self.layout_shown == "tree":
            self._move_tree_cursor(node_id)
        else:
            table = self.query_one(DataTable)
            if str(node_id) in self._in_table:
                table.move_cursor(row=table.get_row_index(str(node_id)))

    def _move_tree_cursor(self, node_id: int) -> None:
        node = self._tree_nodes.get(node_id)
        if node is None:
            return
        above = node.parent
        while above is not None:  # a folded branch hides it: unfold the way down
            above.expand()
            above = above.parent
        tree: Tree[int] = self.query_one(Tree)
        _ = tree.last_line  # lays the lines out now: the node's line number is current
        tree.move_cursor(node)

    def action_toggle_layout(self) -> None:
        """Switch between the tree and the flat table; the selected node stays selected."""
        switcher = self.query_one(ContentSwitcher)
        switcher.current = TABLE if switcher.current == TREE else TREE
        if self._snapshot is not None:
            self.show(self._snapshot)
        if self.selected is not None:
            self.select(self.selected)
        self.focus_nodes()

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted[int]) -> None:
        event.stop()
        if event.node.data is not None and event.node.data != self.selected:
            self._show_node(event.node.data)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if event.row_key.value is None:
            return
        node_id = int(event.row_key.value)
        if node_id != self.selected:
            self._show_node(node_id)

    # -- the details -----------------------------------------------------------------------

    def _show_node(self, node_id: int, refresh_only: bool = False) -> None:
        snapshot = self._snapshot
        if snapshot is None or node_id not in snapshot.nodes:
            return
        changed = node_id != self.selected
        self.selected = node_id
        node = snapshot.nodes[node_id]
        paths = RunPaths(snapshot.info.run_dir)
        parent = "root" if node.parent_id is None else f"node {node.parent_id}"
        self.query_one("#node-title", Static).update(Text.assemble(
            f"Node {node_id}", (f"  ← {parent} · {node.status} · ", "dim"),
            plain(node.strategy or "–", "dim")))
        config_diff = _read(paths.config_diff(node_id)).strip() or "same config as its parent"
        self.query_one("#node-config", Static).update(plain(config_diff))
        self.diff_view.diff = _read(paths.change_diff(node_id))
        metrics = self._metrics_text(paths.metrics(node_id), node.metrics)
        tested = snapshot.ab_tests.get(node_id)
        if tested is not None:
            metrics.append("\nA/B test against its parent's code\n", "bold")
            metrics.append(tested.summary())
        self.query_one("#node-metrics", Static).update(metrics)
        if changed:
            log = paths.training_log(node_id)
            self.node_log.open(log if log.exists() else None)
        else:
            self.node_log.check()
        if not refresh_only:
            self.post_message(self.NodeHighlighted(node_id))

    @staticmethod
    def _metrics_text(path: Path, metrics: dict[str, float]) -> Text:
        text = Text()
        record: dict = {}
        try:
            record = json.loads(_read(path) or "{}")
        except ValueError:
            record = {}
        values = record.get("metrics") or metrics
        if not values:
            return Text("no metrics (yet)", style="dim")
        for name, value in values.items():
            shown = f"{value:.6g}" if isinstance(value, float) else str(value)
            text.append(f"{strip_control(str(name)):<18}", "dim")
            text.append(strip_control(shown) + "\n")
        if record.get("error"):
            text.append("\nerror\n", "bold red")
            text.append(strip_control(str(record["error"])))
        return text
