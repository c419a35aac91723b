"""The git commit of a code-changing node: its message, author, fixed date and refs."""

from __future__ import annotations

import time
from collections.abc import Collection

from engine.attempt import Attempt
from engine.journal import Journal, Step
from engine.vcs import Identity, Lineage, VcsError, change_counts, commit_message
from engine.workspace import CodeStore


class NodeCommits:
    """Commits nodes' code on their parents' commits, the same way after a crash."""

    def __init__(self, lineage: Lineage, code: CodeStore, journal: Journal, run: str,
                 agent_name: str, resumed: Collection[int]):
        self.lineage = lineage
        self.code = code
        self.journal = journal
        self.run = run
        self.agent_name = agent_name
        self.resumed = frozenset(resumed)  # the iterations a resume re-entered

    def commit(self, attempt: Attempt, parent_commit: str) -> str:
        """The node's commit; after a crash mid-commit the refs name it if it got that far
        (if not, committing again makes the identical commit: its dates are fixed)."""
        iteration, number = attempt.iteration, attempt.number
        if iteration in self.resumed:
            commit = self.lineage.node_attempt_commit(iteration, number)
            if commit is not None:
                return commit
        assert attempt.prepared is not None
        files = attempt.prepared.files
        before = self.code.files_at_commit(parent_commit)
        changed = {path: text for path, text in files.items() if before[path] != text}
        human = attempt.human
        author = Identity(**human.author) if human is not None and human.author else \
            Identity(f"proctor {self.agent_name} agent", "proctor@localhost")
        commit = self.lineage.commit_files(parent_commit, changed,
                                           self.message(attempt, before, files), author,
                                           self._proposal_time(iteration, number))
        self.lineage.record_node(iteration, number, commit)
        return commit

    def move_best(self, commit: str | None) -> str | None:
        """Point the run's best-node branch at `commit`; a warning when git refused."""
        if commit is None:
            return None
        try:
            return self.lineage.set_best(commit)
        except VcsError as exc:
            return f"could not move the best-node branch: {exc}"

    def message(self, attempt: Attempt, before: dict[str, str], after: dict[str, str]) -> str:
        proposal, human = attempt.proposal, attempt.human
        code = proposal.code_change
        if human is not None:
            title = human.title
        elif code is not None:
            where = f" in {code.function}" if code.function and code.function != "module" \
                else ""
            title = f"{code.change}{where} ({code.file})"
        else:
            title = proposal.mutation or "code change"
        hypothesis = proposal.hypothesis
        if attempt.edited:
            hypothesis = (hypothesis + " " if hypothesis else "") + \
                "(edited by a human before approval)"
        return commit_message(attempt.iteration, title, hypothesis, change_counts(before, after),
                              self.run, attempt.iteration, approved_by=attempt.approver)

    def _proposal_time(self, iteration: int, attempt: int) -> float:
        """When this attempt's proposal was stored: the commit's fixed date."""
        for event in self.journal.events(iteration):
            if event.step == Step.PROPOSAL_STORED and event.attempt == attempt:
                return event.created_at
        return time.time()
