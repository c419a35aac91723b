"""Which changes paid off in a run, computed from its journal alone (`proctor stats RUN`).

A node's gain is its R² minus its parent's (both finished); a root node (the base config)
has none. A change's *kind* is what it changed: the config keys for a config change, the
template (`[code] name`) or the described change for a code change. Figures that need data a
run does not have yet (no code change, no finished parent) are None, never a made-up 0."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from engine.ab_runs import ab_results
from engine.journal import Journal, Step
from engine.proposals import config_changes
from engine.records import nodes_from_journal
from engine.state import RunState
from engine.tree import Node, NodeStatus

R2_POINT = 0.01  # "a point of R²": one hundredth, as researchers quote it


@dataclass(frozen=True)
class ChangeKind:
    """How often one kind of change was made, and what it gained on average."""

    kind: str
    count: int
    mean_gain: float

    @property
    def total_gain(self) -> float:
        """count × mean gain: how much this kind moved the run in all."""
        return self.count * self.mean_gain


@dataclass(frozen=True)
class RunStats:
    """The modification metrics of one run."""

    nodes: int
    code_changes: int
    code_ran_cleanly: int  # finished (not failed, not diverged)
    code_beat_parent: int
    code_ab_tested: int
    code_confirmed: int  # its A/B test said it helped
    config_changes: int
    mean_gain_code: float | None
    mean_gain_config: float | None
    kinds: tuple[ChangeKind, ...]  # most effective first (count × mean gain)
    training_hours: float
    best_r2: float | None
    r2_gained: float | None  # the best node's R² over the first node's
    r2_points_per_hour: float | None
    agent_cost_usd: float
    usd_per_r2_point: float | None

    @property
    def code_success_rate(self) -> float | None:
        """Share of code changes that beat their parent."""
        return self.code_beat_parent / self.code_changes if self.code_changes else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kinds"] = [{**asdict(kind), "total_gain": kind.total_gain} for kind in self.kinds]
        data["code_success_rate"] = self.code_success_rate
        return data


def change_kind(node: Node, parent_config: dict[str, Any]) -> str:
    """What a node changed: `[code] <name>` for code, else its changed config keys."""
    if node.code_changed:
        mutation = node.mutation.strip()
        return mutation if mutation.lower().startswith("[code]") else \
            f"[code] {mutation or 'edit'}"
    keys = sorted(config_changes(parent_config, node.config))
    return ", ".join(keys) if keys else "baseline"


def run_stats(journal: Journal) -> RunStats:
    """The modification metrics of the run whose journal this is."""
    nodes = {node.id: node for node in nodes_from_journal(journal)}
    gains: dict[int, float] = {}
    for node in nodes.values():
        parent = nodes.get(node.parent_id) if node.parent_id is not None else None
        if parent is not None and node.finished and parent.finished:
            gains[node.id] = node.r2 - parent.r2
    code = [node for node in nodes.values() if node.code_changed]
    config = [node for node in nodes.values() if not node.code_changed
              and node.parent_id is not None]
    by_kind: dict[str, list[float]] = {}
    for node_id, gain in gains.items():
        node = nodes[node_id]
        by_kind.setdefault(change_kind(node, nodes[node.parent_id].config), []).append(gain)
    kinds = sorted((ChangeKind(kind, len(values), statistics.fmean(values))
                    for kind, values in by_kind.items()),
                   key=lambda kind: (-kind.total_gain, kind.kind))
    done = [node for node in nodes.values() if node.status is NodeStatus.DONE]
    best = max(done, key=lambda node: node.r2, default=None)
    first = min(done, key=lambda node: node.id, default=None)
    hours = _training_seconds(journal) / 3600
    gained = best.r2 - first.r2 if best is not None and first is not None else None
    cost = _agent_cost(journal)
    tests = ab_results(journal)
    points = gained / R2_POINT if gained is not None else None
    return RunStats(
        nodes=len(nodes),
        code_changes=len(code),
        code_ran_cleanly=sum(1 for node in code if node.status is NodeStatus.DONE),
        code_beat_parent=sum(1 for node in code if gains.get(node.id, 0.0) > 0),
        code_ab_tested=sum(1 for node in code if node.id in tests),
        code_confirmed=sum(1 for node in code
                           if node.id in tests and tests[node.id].verdict == "helped"),
        config_changes=len(config),
        mean_gain_code=_mean(gains[n.id] for n in code if n.id in gains),
        mean_gain_config=_mean(gains[n.id] for n in config if n.id in gains),
        kinds=tuple(kinds),
        training_hours=hours,
        best_r2=best.r2 if best is not None else None,
        r2_gained=gained,
        r2_points_per_hour=points / hours if points is not None and hours > 0 else None,
        agent_cost_usd=cost,
        usd_per_r2_point=cost / points if points and points > 0 else None,
    )


def _mean(values: Any) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def _training_seconds(journal: Journal) -> float:
    """Wall time of every run the journal finished (each step of each node, as measured)."""
    return sum(training_seconds_by_iteration(journal).values())


def training_seconds_by_iteration(journal: Journal) -> dict[int, float]:
    """Wall time of the runs each iteration finished (repair attempts included), by
    iteration."""
    seconds: dict[int, float] = {}
    for event in journal.events():
        if event.step == Step.RUN_FINISHED and event.iteration is not None:
            wall = event.payload.get("result", {}).get("wall_s", 0.0)
            if isinstance(wall, int | float) and math.isfinite(wall):
                seconds[event.iteration] = seconds.get(event.iteration, 0.0) + wall
    return seconds


def _agent_cost(journal: Journal) -> float:
    """What the agent spent: its ledger (every call, re-asks included) when it keeps one,
    else what its stored proposals cost (the offline agent: nothing)."""
    ledger = RunState(journal).agent_spent_usd
    if ledger is not None:
        return ledger
    return sum(float(event.payload.get("cost_usd") or 0.0) for event in journal.events()
               if event.step == Step.PROPOSAL_STORED)
