"""One attempt of an iteration, the object the loop passes from step to step, and the
decision a review ends in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.human import HumanChange
from engine.proposal import Proposal
from engine.proposals import Prepared
from engine.review import Review
from engine.tree import Node


@dataclass(frozen=True)
class Decision:
    """The review's outcome; `files` holds the human's edited version when they edited it;
    `approver` is who decided ("name <email>"), for the commit's trailer."""

    approved: bool
    reason: str = ""
    by: str = "policy"  # "policy", "human", or "stop" (the run stopped while it waited)
    files: dict[str, str] | None = None
    approver: str = ""

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"approved": self.approved, "reason": self.reason,
                                  "by": self.by, "approver": self.approver}
        if self.files is not None:
            record |= {"edited": True, "files": self.files}
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(data["approved"], data.get("reason", ""), data.get("by", "policy"),
                   data.get("files"), data.get("approver", ""))


@dataclass
class Attempt:
    """One attempt of an iteration: filled in as it is prepared, reviewed and decided."""

    iteration: int
    number: int
    proposal: Proposal
    human: HumanChange | None
    prepared: Prepared | None = None
    review: Review | None = None
    decision: Decision | None = None

    @property
    def node(self) -> Node:
        assert self.prepared is not None, "an attempt has a node once prepared"
        return self.prepared.node

    @property
    def edited(self) -> bool:
        """Whether a human rewrote the proposal's code before approving it."""
        return self.decision is not None and self.decision.files is not None

    @property
    def approver(self) -> str | None:
        """Who approved an agent's change, for the commit (None: no human did)."""
        decision = self.decision
        if decision is None or decision.by != "human" or self.human is not None:
            return None
        return decision.approver or None
