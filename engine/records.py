"""What a finished iteration leaves in the run folder: the analysis entries, proctor's own
do-not-retry notes in memory.md, the score table and the block's memory snapshot."""

from __future__ import annotations

from engine.config import ExperimentConfig
from engine.journal import Journal, Step
from engine.logs import RunLogs
from engine.memory import Memory
from engine.proposal import Proposal
from engine.runner import RunResult, RunStatus
from engine.state import RunState
from engine.tree import Node, NodeStatus, Tree, block_of


def nodes_from_journal(journal: Journal) -> list[Node]:
    """The finished nodes the journal records, in order (an unfinished iteration's node is
    added when a resume replays its step)."""
    nodes = []
    for iteration in journal.completed_iterations():
        recorded = journal.payload(iteration, Step.RECORDED)
        if recorded is not None and recorded.get("node"):
            nodes.append(Node.from_dict(recorded["node"]))
    return nodes


def attempt_proposals(journal: Journal, iteration: int) -> list[Proposal]:
    """The proposals of an iteration's attempts, in order."""
    return [Proposal.model_validate(e.payload["proposal"])
            for e in journal.events(iteration) if e.step == Step.PROPOSAL_STORED]


class RunRecords:
    """Writes the records of finished nodes (each write is repeatable after a crash)."""

    def __init__(self, config: ExperimentConfig, journal: Journal, logs: RunLogs, tree: Tree):
        self.exploration = config.exploration
        self.journal = journal
        self.state = RunState(journal)
        self.logs = logs
        self.tree = tree

    def node_finished(self, node: Node, proposal: Proposal, by_agent: bool,
                      result: RunResult) -> None:
        """A node's outcome: a failed code change of the agent's becomes a note it may not
        drop; the analysis entry waits for the next proposal's analysis of it."""
        iteration = node.id
        # a run whose machine was lost says nothing about its code: it may be proposed again
        if node.status is not NodeStatus.DONE and node.code_changed and by_agent \
                and result.status is not RunStatus.LOST:
            change = proposal.code_change.change if proposal.code_change else proposal.mutation
            detail = result.error.splitlines()[0] if result.error else "no detail"
            note = f"node {iteration}: {change} ({result.status.value}: {detail})"
            notes = self.state.do_not_retry
            if note not in notes:
                self.state.do_not_retry = [*notes, note]
            self.logs.add_do_not_retry(note)
        pending = self.state.unlogged
        if iteration not in pending:
            self.state.unlogged = [*pending, iteration]
        self.logs.write_scores(self.tree.render_score_table(iteration + 1))
        self.logs.settle_iterations([node])  # its memory line shows the outcome, not pending
        if iteration % self.exploration.block_size == 0:
            self.logs.snapshot_memory(block_of(iteration, self.exploration.block_size))

    def memory_rewritten(self, text: str, iteration: int) -> None:
        """The agent's new memory.md (proposed for `iteration`), with proctor's do-not-retry
        notes put back, the lines of its block's other nodes that it was drafted without
        (another slot applied them meanwhile) kept, and every finished node's outcome filled
        in."""
        block = block_of(iteration, self.exploration.block_size)
        others = {node.id for node in self.tree if node.id != iteration
                  and block_of(node.id, self.exploration.block_size) == block}
        memory = Memory.parse(text)
        if memory.keep_iterations(Memory.parse(self.logs.read_memory()), others):
            text = memory.text()
        self.logs.rewrite_memory(text)
        for note in self.state.do_not_retry:
            self.logs.add_do_not_retry(note)
        # an agent's memory written from an older view must not bring back a pending line
        self.logs.settle_iterations([node for node in self.tree if node.finished])

    def flush_analysis(self, next_parent: int | None, analysis: str) -> None:
        """Write the analysis entries of nodes finished since the last proposal."""
        pending = self.state.unlogged
        keys = list(self.exploration.search_space)
        while pending:
            node_id = pending[0]
            node = self.tree.get(node_id)
            parent = self.tree.get(node.parent_id) if node.parent_id is not None else None
            proposal = attempt_proposals(self.journal, node_id)[-1]
            entry = self.logs.format_entry(node, proposal, parent, next_parent, analysis, keys)
            self.logs.append_analysis(entry, node_id)
            pending.pop(0)
            self.state.unlogged = pending
