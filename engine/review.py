"""The review of one proposal, as the journal holds it: what a human decides on.

The engine journals a `review` step for every proposal it prepares (awaiting a human, passed
by the policy, or refused and why), before any decision. The app, attached viewers and the
CLI read it from there, so what a human approves is exactly what the engine prepared; a
decision names the review's `proposal_id` and binds to that proposal only."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.journal import Journal, Step


def proposal_id(iteration: int, attempt: int, content: dict[str, Any]) -> str:
    """`<iteration>.<attempt>-<digest>`: the digest covers the attempt and the proposal's
    whole content, so no two proposals share an id, nor an id half of one and half of
    another."""
    text = json.dumps([iteration, attempt, content], sort_keys=True, separators=(",", ":"),
                      default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{iteration}.{attempt}-{digest}"


@dataclass(frozen=True)
class Review:
    """A prepared proposal: its diffs, whether it waits for a human, or why it was refused."""

    proposal_id: str
    iteration: int
    attempt: int
    mutation: str
    diff: str  # unified diff of the editable files ('' for a config-only change)
    config_diff: str  # `key: old -> new` lines
    files: tuple[str, ...] = ()  # the editable files it changes
    texts: dict[str, str] = field(default_factory=dict)  # those files' whole texts after it
    added: int = 0
    removed: int = 0
    awaiting: bool = False  # waits for a human decision
    refused: str | None = None  # why the engine refused it (nothing applied)
    policy_violation: bool = False
    by_human: bool = False  # a revert or an adopted edit: a human's own change
    parent_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["files"] = list(self.files)
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Review:
        known = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        known["files"] = tuple(known.get("files", ()))
        return cls(**known)

    def summary(self) -> str:
        """One line: `proposal 6.1-ab12cd34ef (iteration 6): mutation; files +a/-b`."""
        code = f"; {', '.join(self.files)} +{self.added}/-{self.removed}" if self.files else ""
        return f"proposal {self.proposal_id} (iteration {self.iteration}): {self.mutation}{code}"


def diff_counts(diff: str) -> tuple[int, int]:
    """Lines added and removed by a unified diff."""
    added = removed = 0
    for line in diff.splitlines():
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return added, removed


def waiting_reviews(journal: Journal) -> list[Review]:
    """The reviews humans must decide now, oldest iteration first: per unfinished iteration
    (one per slot in flight) its latest review, if it awaits and no decision is recorded for
    its attempt."""
    waiting = []
    for iteration in journal.unfinished_iterations():
        latest: Review | None = None
        decided: set[int] = set()
        for event in journal.events(iteration):
            if event.step == Step.REVIEW:
                latest = Review.from_dict(event.payload)
            elif event.step == Step.DECISION:
                decided.add(event.attempt)
        if latest is not None and latest.awaiting and latest.attempt not in decided:
            waiting.append(latest)
    return waiting


def waiting_review(journal: Journal) -> Review | None:
    """The oldest review that waits for a human (see `waiting_reviews`); None when none."""
    waiting = waiting_reviews(journal)
    return waiting[0] if waiting else None


def find_review(journal: Journal, proposal_id: str) -> Review | None:
    """The journaled review of `proposal_id` (`<iteration>.<attempt>-<digest>`), or None."""
    try:
        iteration, attempt = (int(part) for part in proposal_id.split("-")[0].split("."))
    except ValueError:
        return None
    payload = journal.payload(iteration, Step.REVIEW, attempt)
    if payload is None or payload.get("proposal_id") != proposal_id:
        return None
    return Review.from_dict(payload)
