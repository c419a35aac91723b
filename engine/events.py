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


@dataclass(frozen=True)
class IterationStarted(Event):
    iteration: int
    block: int
    total_iterations: int


@dataclass(frozen=True)
class ProposalReady(Event):
    iteration: int
    proposal: Proposal
    diff: str
    config_diff: str
    awaiting_review: bool


@dataclass(frozen=True)
class ProposalDecided(Event):
    iteration: int
    approved: bool
    reason: str = ""
    by: str = "policy"


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
    pid: int


@dataclass(frozen=True)
class LogLines(Event):
    """A batch of training-log lines (never one event per line)."""

    iteration: int
    lines: tuple[str, ...]


@dataclass(frozen=True)
class TrainingProgress(Event):
    iteration: int
    step: int
    total: int


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
class Command:
    """Base of every command a human (or a policy) can give the engine."""

    def to_payload(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **self.__dict__}


@dataclass(frozen=True)
class Approve(Command):
    iteration: int | None = None  # None: whatever is pending


@dataclass(frozen=True)
class Reject(Command):
    reason: str
    iteration: int | None = None


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
    cls.__name__: cls for cls in (Approve, Reject, Pause, ResumeRun, Stop)
}


def command_from_payload(payload: dict[str, Any]) -> Command:
    """Rebuild a command written to the journal by another process."""
    fields = dict(payload)
    kind = fields.pop("kind")
    return COMMANDS[kind](**fields)
