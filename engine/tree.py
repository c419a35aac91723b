"""The exploration tree: nodes, visit counts, block bookkeeping and the UCB/PUCT scores.

Pure in-memory; the engine rebuilds it from the journal on resume (`Tree.from_nodes`).
Descendant counts are kept incrementally (O(depth) per add) so scoring stays cheap at
thousands of nodes.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

ScoreKind = Literal["puct", "ucb1"]

# At a block's start the table offers this many of the best finished nodes as parents.
BLOCK_START_CANDIDATES = 5


class TreeError(ValueError):
    """A node that does not fit the tree (unknown parent, duplicate id, bad field)."""


class NodeStatus(StrEnum):
    PENDING = "pending"  # proposed or approved, not finished
    RUNNING = "running"
    DONE = "done"  # the run finished and was evaluated
    FAILED = "failed"  # invalid edit, crash, signal, timeout, OOM, resource limit
    DIVERGED = "diverged"  # ran, but the metrics are unusable (scored as the worst)


FINISHED = frozenset({NodeStatus.DONE, NodeStatus.DIVERGED})


def status_after_run(run_status: str) -> NodeStatus:
    """The node status a run ends in: "ok" is done, "diverged" diverged, anything else
    (a crash, a timeout, a limit) failed."""
    return {"ok": NodeStatus.DONE, "diverged": NodeStatus.DIVERGED}.get(
        str(run_status), NodeStatus.FAILED)
_MARKERS = {
    NodeStatus.PENDING: "[PENDING]",
    NodeStatus.RUNNING: "[RUNNING]",
    NodeStatus.FAILED: "[FAILED]",
    NodeStatus.DIVERGED: "[DIVERGED]",
}


@dataclass
class Node:
    """One experiment: its parent, the full config that ran, its code commit and results."""

    id: int  # the iteration that created it, from 1
    parent_id: int | None  # None: the base config and the user's code as they were
    config: dict[str, Any]
    commit: str | None = None  # None: the same code as its parent chain's
    code_changed: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    status: NodeStatus = NodeStatus.PENDING
    author: str = "agent"  # "agent" | "human"
    strategy: str = ""
    mutation: str = ""  # the score table's label, e.g. "learning_rate: 1E-4 -> 5E-5"
    block: int = 0  # 0: the tree assigns it from the id and the block size

    @property
    def r2(self) -> float:
        """R2 as the score sees it: missing, NaN and diverged count as 0."""
        if self.status is NodeStatus.DIVERGED:
            return 0.0
        value = self.metrics.get("final_r2")
        if value is None or not math.isfinite(value):
            return 0.0
        return float(value)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for the journal)."""
        data = asdict(self)
        data["status"] = str(self.status)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        """The inverse of `to_dict`; unknown keys are an error."""
        try:
            values = dict(data)
            values["status"] = NodeStatus(values.get("status", NodeStatus.PENDING))
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise TreeError(f"not a node record: {exc}") from None


@dataclass(frozen=True)
class ScoreRow:
    """One line of the score table, typed (for `proctor status` and the TUI tree view)."""

    node_id: int
    parent_id: int | None
    r2: float  # the measured final_r2; NaN when missing
    score: float
    visits: int
    code_changed: bool
    status: NodeStatus
    mutation: str


def block_of(iteration: int, block_size: int) -> int:
    """The 1-based block holding an iteration."""
    return (iteration - 1) // block_size + 1


def block_span(block: int, block_size: int) -> tuple[int, int]:
    """First and last iteration of a block."""
    return (block - 1) * block_size + 1, block * block_size


def puct_score(r2: float, visits: int, n_block: int, c: float) -> float:
    """What the original computed: r2 + c * sqrt(N_block) / (1 + V)."""
    return r2 + c * math.sqrt(max(n_block, 0)) / (1 + visits)


def ucb1_score(r2: float, visits: int, n_block: int, c: float) -> float:
    """What the original documented: r2 + c * sqrt(ln N / n); ln N is 0 for N <= 1."""
    log_n = math.log(n_block) if n_block > 1 else 0.0
    return r2 + c * math.sqrt(log_n / max(visits, 1))


_SCORERS = {"puct": puct_score, "ucb1": ucb1_score}


def _fmt(value: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "nan"
    return f"{value:.{digits}f}"


class Tree:
    """All nodes of one run, with visit counts and the scores the agent chooses parents by."""

    def __init__(self, *, block_size: int = 12, score: ScoreKind = "puct", c: float = 1.414):
        if block_size < 1:
            raise TreeError("block_size must be at least 1")
        if score not in _SCORERS:
            raise TreeError(f"unknown score '{score}' (use puct or ucb1)")
        self.block_size = block_size
        self.score_kind: ScoreKind = score
        self.c = c
        self._nodes: dict[int, Node] = {}
        self._children: dict[int, list[int]] = {}
        self._descendants: dict[int, int] = {}
        self._by_block: dict[int, list[int]] = {}
        self._max_id = 0
        # code nodes that may not be parents: under an A/B test, or one that did not confirm
        # their gain (`exploration.ab_seeds`)
        self.withheld: set[int] = set()

    @classmethod
    def from_nodes(
        cls,
        nodes: Iterable[Node],
        *,
        block_size: int = 12,
        score: ScoreKind = "puct",
        c: float = 1.414,
    ) -> Tree:
        """Rebuild a tree (e.g. from the journal); nodes may come in any order."""
        tree = cls(block_size=block_size, score=score, c=c)
        for node in sorted(nodes, key=lambda n: n.id):
            tree.add(node)
        return tree

    # -- structure -------------------------------------------------------------------------

    def add(self, node: Node) -> Node:
        """Insert a node (pending or finished); its ancestors gain a visit at once."""
        if node.id < 1:
            raise TreeError(f"node id must be 1 or more, got {node.id}")
        if node.id in self._nodes:
            raise TreeError(f"node {node.id} is already in the tree")
        if node.parent_id is not None:
            parent = self._nodes.get(node.parent_id)
            if parent is None:
                raise TreeError(f"node {node.id}: parent {node.parent_id} is not in the tree")
            if parent.status is NodeStatus.FAILED:
                raise TreeError(f"node {node.id}: parent {node.parent_id} failed")
        if node.author not in ("agent", "human"):
            raise TreeError(f"node {node.id}: author must be agent or human, not {node.author!r}")
        if not isinstance(node.status, NodeStatus):
            node = replace(node, status=NodeStatus(node.status))
        if node.block == 0:
            node = replace(node, block=block_of(node.id, self.block_size))
        self._nodes[node.id] = node
        self._children[node.id] = []
        self._descendants[node.id] = 0
        self._by_block.setdefault(node.block, []).append(node.id)
        self._max_id = max(self._max_id, node.id)
        ancestor = node.parent_id
        if ancestor is not None:
            self._children[ancestor].append(node.id)
        while ancestor is not None:
            self._descendants[ancestor] += 1
            ancestor = self._nodes[ancestor].parent_id
        return node

    def commit_of(self, node_id: int | None, base: str) -> str:
        """The commit whose code a node runs: its own, or its nearest ancestor's (`base` for
        the root and for a node this tree does not hold)."""
        while node_id is not None and node_id in self._nodes:
            node = self._nodes[node_id]
            if node.commit is not None:
                return node.commit
            node_id = node.parent_id
        return base

    def put(self, node: Node) -> Node:
        """Add a node, or replace what a later attempt of its iteration changes (a repair
        keeps the id and parent; its code, config and strategy are new, its result not yet)."""
        if node.id not in self._nodes:
            return self.add(node)
        current = self._nodes[node.id]
        current.status, current.metrics = NodeStatus.PENDING, {}
        current.config, current.commit = node.config, node.commit
        current.code_changed, current.mutation = node.code_changed, node.mutation
        current.strategy, current.author = node.strategy, node.author
        return current

    def update(
        self,
        node_id: int,
        *,
        status: NodeStatus | None = None,
        metrics: dict[str, float] | None = None,
        commit: str | None = None,
    ) -> Node:
        """Change a node's status, metrics (merged) or commit."""
        node = self.get(node_id)
        if status is not None:
            node.status = NodeStatus(status)
        if metrics is not None:
            node.metrics.update(metrics)
        if commit is not None:
            node.commit = commit
        return node

    def get(self, node_id: int) -> Node:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise TreeError(f"no node {node_id} in the tree") from None

    __getitem__ = get

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return (self._nodes[i] for i in sorted(self._nodes))

    def children(self, node_id: int) -> list[Node]:
        self.get(node_id)
        return [self._nodes[i] for i in self._children[node_id]]

    def lineage(self, node_id: int) -> list[Node]:
        """The node and its ancestors, root first."""
        chain = [self.get(node_id)]
        while chain[-1].parent_id is not None:
            chain.append(self._nodes[chain[-1].parent_id])
        chain.reverse()
        return chain

    def descendants_count(self, node_id: int) -> int:
        self.get(node_id)
        return self._descendants[node_id]

    def visits(self, node_id: int) -> int:
        """V = 1 + all descendants (any block, pending included)."""
        return 1 + self.descendants_count(node_id)

    @property
    def next_id(self) -> int:
        return self._max_id + 1

    # -- blocks and scores -----------------------------------------------------------------

    def current_block(self, iteration: int | None = None) -> int:
        """The block of `iteration` (default: the next iteration to be proposed)."""
        return block_of(iteration or self.next_id, self.block_size)

    def block_nodes(self, block: int) -> list[Node]:
        return [self._nodes[i] for i in self._by_block.get(block, [])]

    def score(self, node_id: int, iteration: int | None = None) -> float:
        n_block = len(self._by_block.get(self.current_block(iteration), []))
        return self._score(self.get(node_id), n_block)

    def _score(self, node: Node, n_block: int) -> float:
        visits = 1 + self._descendants[node.id]
        return _SCORERS[self.score_kind](node.r2, visits, n_block, self.c)

    def _row(self, node: Node, n_block: int) -> ScoreRow:
        visits = 1 + self._descendants[node.id]
        return ScoreRow(
            node_id=node.id,
            parent_id=node.parent_id,
            r2=float(node.metrics.get("final_r2", math.nan)),
            score=_SCORERS[self.score_kind](node.r2, visits, n_block, self.c),
            visits=visits,
            code_changed=node.code_changed,
            status=node.status,
            mutation=node.mutation,
        )

    def _ranked(self, nodes: Iterable[Node], n_block: int) -> list[ScoreRow]:
        rows = [self._row(node, n_block) for node in nodes]
        rows.sort(key=lambda row: (-row.score, row.node_id))
        return rows

    def _block_start_nodes(self, limit: int) -> list[Node]:
        finished = (node for node in self._nodes.values()
                    if node.finished and node.id not in self.withheld)
        return heapq.nsmallest(limit, finished, key=lambda node: (-node.r2, node.id))

    def candidates(self, iteration: int | None = None) -> list[ScoreRow]:
        """Possible parents, best score first: the finished, non-failed nodes of the current
        block; at a block's start (none yet) the best finished nodes overall."""
        block = self.current_block(iteration)
        ids = self._by_block.get(block, [])
        if not ids:
            return self._ranked(self._block_start_nodes(BLOCK_START_CANDIDATES), 0)
        finished = [self._nodes[i] for i in ids
                    if self._nodes[i].finished and i not in self.withheld]
        return self._ranked(finished, len(ids))

    def rows(self, iteration: int | None = None, *, block_only: bool = True) -> list[ScoreRow]:
        """Score rows, best first: the current block's nodes (all nodes with block_only off)."""
        ids = self._by_block.get(self.current_block(iteration), [])
        nodes = self.block_nodes(self.current_block(iteration)) if block_only else self
        return self._ranked(nodes, len(ids))

    def render_score_table(self, iteration: int | None = None) -> str:
        """The `ucb_scores.txt` text in the original's format (current block, by score)."""
        block = self.current_block(iteration)
        first, last = block_span(block, self.block_size)
        rows = self.rows(iteration)
        lines = [
            f"=== UCB Scores (Block {block}, iters {first}-{last}, N={len(rows)}, c={self.c}) ===",
            "",
        ]
        if not rows:
            rows = self.candidates(iteration)
            if rows:
                lines.append("(block start: the best finished nodes so far)")
        for row in rows:
            metrics = self._nodes[row.node_id].metrics
            seconds = metrics.get("training_time_s")
            minutes = seconds / 60 if seconds is not None else None
            parent = "root" if row.parent_id is None else str(row.parent_id)
            line = (
                f"Node {row.node_id}: UCB={_fmt(row.score, 3)}, parent={parent}, "
                f"visits={row.visits}, R2={_fmt(row.r2, 3)}, "
                f"slope={_fmt(metrics.get('slope'), 3)}, time={_fmt(minutes, 1)}min"
            )
            tags = [_MARKERS[row.status]] if row.status in _MARKERS else []
            if row.code_changed:
                tags.append("[CODE]")
            if row.mutation:
                tags.append(row.mutation)
            lines.append(" ".join([line, *tags]))
        return "\n".join(lines) + "\n"

    # -- helpers for the strategy table ----------------------------------------------------

    def best_node(self) -> Node | None:
        """The done node with the highest R2 (earliest on ties); None before any."""
        done = [node for node in self._nodes.values() if node.status is NodeStatus.DONE]
        return min(done, key=lambda node: (-node.r2, node.id), default=None)

    def tail_chain_length(self) -> int:
        """How many of the latest non-failed nodes form a chain, each the child of the one
        before it (failed dead ends are skipped)."""
        alive = [node for node in self if node.status is not NodeStatus.FAILED]
        if not alive:
            return 0
        length = 1
        for later, earlier in zip(reversed(alive), reversed(alive[:-1]), strict=False):
            if later.parent_id != earlier.id:
                break
            length += 1
        return length

    def chain_is_linear(self, min_length: int = 4) -> bool:
        """True when the latest `min_length` live nodes grew as one chain (forced branch)."""
        return self.tail_chain_length() >= min_length
