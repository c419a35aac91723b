"""Typed events the engine publishes and typed commands it accepts.

The TUI, the headless printer and an attached viewer are all consumers of the same events;
everything a human can do is one of the commands."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.proposal import Proposal


@dataclass(frozen=True)
class Event:
    """Base of every engine event."""


@dataclass(frozen=True)
class RunOpened(Event):
    run: str
    run_dir: str
    total_iterations: int
    resumed_at: int | None = None
    sandbox_missing: tuple[str, ...] = ()  # layers of the runs' sandbox this OS lacks, and why
    slots: tuple[str, ...] = ()  # where each slot runs, slot 1 first ("local slot 1", ...)


@dataclass(frozen=True)
class IterationStarted(Event):
    iteration: int
    block: int
    total_iterations: int
    slot: int = 1


@dataclass(frozen=True)
class ProposalReady(Event):
    """A proposal prepared for review (the journal's `review` step); decisions name
    `proposal_id`."""

    iteration: int
    proposal: Proposal
    diff: str
    config_diff: str
    awaiting_review: bool
    proposal_id: str = ""


@dataclass(frozen=True)
class ProposalDecided(Event):
    iteration: int
    approved: bool
    reason: str = ""
    by: str = "policy"
    proposal_id: str = ""


@dataclass(frozen=True)
class ProposalInvalid(Event):
    iteration: int
    error: str
    attempt: int


@dataclass(frozen=True)
class TrainingStarted(Event):
    iteration: int
    node_id: int
    parent_id: int | None
    mutation: str
    pid: int  # the local step's leader; 0 for a run on a Dask worker
    slot: int = 1
    where: str = ""  # "local slot 2 on GPU 1", "dask worker tcp://10.1.2.3:40211"


@dataclass(frozen=True)
class LogLines(Event):
    """A batch of training-log lines (never one event per line)."""

    iteration: int
    lines: tuple[str, ...]


@dataclass(frozen=True)
class TrainingProgress(Event):
    """How far the run is: `phase` is "simulation" (frames of the dataset) or "training"."""

    iteration: int
    step: int
    total: int
    phase: str = "training"


@dataclass(frozen=True)
class NodeFinished(Event):
    iteration: int
    node_id: int
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    best_r2: float | None = None


@dataclass(frozen=True)
class IterationSkipped(Event):
    iteration: int
    reason: str


@dataclass(frozen=True)
class AgentCost(Event):
    """What the agent's answer for an iteration cost, and the run's total so far."""

    iteration: int
    cost_usd: float
    total_usd: float


@dataclass(frozen=True)
class Paused(Event):
    reason: str


@dataclass(frozen=True)
class Resumed(Event):
    pass


@dataclass(frozen=True)
class EngineError(Event):
    message: str


@dataclass(frozen=True)
class RunFinished(Event):
    reason: str
    best_node: int | None
    best_r2: float | None


@dataclass(frozen=True)
class PolicyViolation(Event):
    """An edit that tried to leave the whitelist (a path outside it, a symlink)."""

    iteration: int
    error: str


@dataclass(frozen=True)
class ManualEditDetected(Event):
    """A human changed a whitelisted file; `where` is "checkout" or "workspace"."""

    path: str
    diff: str
    where: str


@dataclass(frozen=True)
class ManualEditResolved(Event):
    """A manual edit was adopted (it becomes node `node_id`) or ignored."""

    path: str | None
    adopted: bool
    node_id: int | None = None


@dataclass(frozen=True)
class ProposalStale(Event):
    """A human edited a file that the pending proposal of `iteration` also changes."""

    iteration: int
    path: str


@dataclass(frozen=True)
class EditedVersionInvalid(Event):
    """The human's edited version of a proposal failed validation; the proposal keeps waiting."""

    iteration: int
    error: str


@dataclass(frozen=True)
class NodeReverted(Event):
    """Node `node_id` was created with the code of `reverted_id`'s parent."""

    node_id: int
    reverted_id: int
    commit: str | None = None


@dataclass(frozen=True)
class CodeCommitted(Event):
    """A code-changing node became git commit `commit`."""

    node_id: int
    commit: str


@dataclass(frozen=True)
class Command:
    """Base of every command a human (or a policy) can give the engine."""

    def to_payload(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **self.__dict__}


@dataclass(frozen=True)
class Approve(Command):
    """Approve the proposal `proposal_id` (from its review); any other one is refused."""

    proposal_id: str
    by: str = ""  # who approved, "name <email>" (the git identity of the human)


@dataclass(frozen=True)
class Reject(Command):
    proposal_id: str
    reason: str
    by: str = ""


@dataclass(frozen=True)
class ApproveEdited(Command):
    """Approve a proposal whose editable files the human rewrote (e.g. in $EDITOR)."""

    proposal_id: str
    files: dict[str, str]
    by: str = ""


DECISIONS = (Approve, Reject, ApproveEdited)


@dataclass(frozen=True)
class Revert(Command):
    """Create a new node whose code is `node_id`'s parent's (history is never rewritten)."""

    node_id: int


@dataclass(frozen=True)
class AdoptManualEdit(Command):
    """Make the detected manual edit (of `path`, or all of them) the next node's code."""

    path: str | None = None


@dataclass(frozen=True)
class IgnoreManualEdit(Command):
    """Dismiss the detected manual edit (of `path`, or all of them)."""

    path: str | None = None


@dataclass(frozen=True)
class Pause(Command):
    reason: str = "paused by a human"


@dataclass(frozen=True)
class ResumeRun(Command):
    pass


@dataclass(frozen=True)
class Stop(Command):
    reason: str = "stopped by a human"


COMMANDS: dict[str, type[Command]] = {
    cls.__name__: cls
    for cls in (Approve, Reject, ApproveEdited, Revert, AdoptManualEdit, IgnoreManualEdit,
                Pause, ResumeRun, Stop)
}


def command_from_payload(payload: dict[str, Any]) -> Command:
    """Rebuild a command written to the journal by another process."""
    fields = dict(payload)
    kind = fields.pop("kind")
    return COMMANDS[kind](**fields)
