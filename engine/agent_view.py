"""What the agent is shown before it proposes: the tree as summaries, the score table,
memory, the protocol, the latest training log and the code at any node."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.ab_runs import ab_results
from engine.agents.base import AgentContext, InFlight, NodeSummary, Repair
from engine.config import ExperimentConfig
from engine.journal import Journal
from engine.logs import RunLogs, log_tail
from engine.paths import RunPaths
from engine.proposals import ProposalChecker, config_changes
from engine.tree import Node, ScoreRow, Tree, block_of


class AgentView:
    """Builds each `AgentContext`; node summaries that cannot have changed are kept."""

    def __init__(self, config: ExperimentConfig, project_root: Path, tree: Tree,
                 checker: ProposalChecker, logs: RunLogs, paths: RunPaths,
                 files_at: Callable[[int | None], dict[str, str]], journal: Journal):
        self.config = config
        self.exploration = config.exploration
        self.project_root = project_root
        self.tree = tree
        self.checker = checker
        self.logs = logs
        self.paths = paths
        self.files_at = files_at
        self.journal = journal
        self._summaries: dict[int, NodeSummary] = {}

    def forget(self, node_id: int) -> None:
        """A node changed (a repair re-applied it): summarise it afresh."""
        self._summaries.pop(node_id, None)

    def instructions(self) -> str:
        path = self.project_root / self.exploration.instructions
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            return ""

    def context(self, iteration: int, attempt: int, repair: Repair | None,
                rejections: list[str], *, slot: int = 1, slots: int = 1,
                role: str | None = None, in_flight: tuple[InFlight, ...] = ()) -> AgentContext:
        size = self.exploration.block_size
        candidate_rows = self.tree.candidates(iteration)
        score_table = self.tree.render_score_table(iteration)
        self.logs.write_scores(score_table)
        latest = max((node.id for node in self.tree), default=None)
        log = self.paths.training_log(latest) if latest is not None else None
        return AgentContext(
            iteration=iteration,
            block=block_of(iteration, size),
            iteration_in_block=(iteration - 1) % size + 1,
            block_size=size,
            block_end=iteration % size == 0,
            instructions=self.instructions(),
            memory=self.logs.read_memory(),
            score_table=score_table,
            config=self.config,
            nodes=self._all_summaries(iteration, candidate_rows),
            candidates=tuple(row.node_id for row in candidate_rows),
            latest_log_tail=log_tail(log) if log is not None and log.exists() else "",
            rejections=tuple(rejections),
            repair=repair,
            read_file=lambda node_id, path: self.files_at(node_id).get(path, ""),
            attempt=attempt,
            slot=slot,
            slots=slots,
            role=role,
            in_flight=in_flight,
            ab_tests={node_id: result.summary()
                      for node_id, result in ab_results(self.journal).items()},
        )

    def _all_summaries(self, iteration: int,
                       candidate_rows: list[ScoreRow]) -> tuple[NodeSummary, ...]:
        """Every node as the agent sees it. Scores exist for the current block and the
        candidates; other summaries only change with their node's status, so they are kept."""
        scores = {row.node_id: row.score for row in self.tree.rows(iteration)}
        scores.update((row.node_id, row.score) for row in candidate_rows)
        summaries = []
        for node in self.tree:
            kept = self._summaries.get(node.id)
            if node.id in scores or kept is None or kept.status != node.status:
                kept = self._summary(node, scores.get(node.id) if node.finished else None)
                if node.id not in scores:
                    self._summaries[node.id] = kept
            summaries.append(kept)
        return tuple(summaries)

    def _summary(self, node: Node, score: float | None) -> NodeSummary:
        changes = {key: new for key, (_, new) in
                   config_changes(self.checker.parent_config(node), node.config).items()}
        return NodeSummary(
            id=node.id, parent_id=node.parent_id, block=node.block, status=str(node.status),
            strategy=node.strategy, mutation=node.mutation, code_changed=node.code_changed,
            config_changes=changes, config=node.config, metrics=dict(node.metrics),
            score=score,
        )
