"""What the app reads from the run folder (through `engine.attach.RunReader`), as one value.

Taken in a worker thread whenever the events say the tree changed; the views only ever see
the finished snapshot, so the UI thread never touches SQLite."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from engine.ab import Comparison
from engine.ab_runs import ab_results
from engine.attach import RunInfo, RunReader
from engine.tree import Node, NodeStatus, ScoreRow

RECENT_ITERATIONS = 5  # the ETA averages the durations of this many latest iterations


@dataclass(frozen=True)
class RunSnapshot:
    """The run's tree and counters at one moment."""

    info: RunInfo
    rows: tuple[ScoreRow, ...] = ()  # every node, by id
    nodes: dict[int, Node] = field(default_factory=dict)
    best_id: int | None = None
    best_r2: float | None = None
    cost_usd: float = 0.0
    completed: int = 0
    recent_durations: tuple[float, ...] = ()
    unfinished_slots: dict[int, int] = field(default_factory=dict)  # iteration -> its slot
    ab_tests: dict[int, Comparison] = field(default_factory=dict)  # code node -> its A/B test

    def eta_s(self, total_iterations: int) -> float | None:
        """Seconds left at the recent pace; None before an iteration finished."""
        if not self.recent_durations:
            return None
        pace = sum(self.recent_durations) / len(self.recent_durations)
        return max(0, total_iterations - self.completed) * pace

    def revertable(self, node_id: int | None) -> bool:
        """Whether `node_id` is a finished node with a parent to go back to."""
        node = self.nodes.get(node_id) if node_id is not None else None
        return node is not None and node.parent_id is not None and node.status in (
            NodeStatus.DONE, NodeStatus.DIVERGED)

    def latest_code_change(self) -> int | None:
        """The newest finished node that changed code (the Review tab's revert target)."""
        ids = [i for i, node in self.nodes.items() if node.code_changed and self.revertable(i)]
        return max(ids) if ids else None


def take_snapshot(reader: RunReader) -> RunSnapshot:
    """Fold what the journal gained and copy out what the views need (thread-safe)."""
    reader.refresh()
    with reader.lock:
        tree = reader.tree
        rows = tuple(sorted(tree.rows(block_only=False), key=lambda row: row.node_id))
        nodes = {node.id: copy.copy(node) for node in tree}
        best = tree.best_node()
        times = sorted(reader.iteration_times.items())
        cost = reader.cost_usd
        unfinished_slots = dict(reader.unfinished_slots)
        ab_tests = ab_results(reader.journal)
    done = [(start, end) for _, (start, end) in times if end is not None]
    durations = tuple(end - start for start, end in done[-RECENT_ITERATIONS:])
    return RunSnapshot(
        info=reader.info, rows=rows, nodes=nodes,
        best_id=best.id if best else None,
        best_r2=best.metrics.get("final_r2") if best else None,
        cost_usd=cost, completed=len(done), recent_durations=durations,
        unfinished_slots=unfinished_slots, ab_tests=ab_tests,
    )
