"""The agent protocol: a context in, one proposal (plus its reasoning) out."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.config import ExperimentConfig
from engine.proposal import Proposal


@dataclass(frozen=True)
class NodeSummary:
    """What an agent may know about one node of the tree."""

    id: int
    parent_id: int | None
    block: int
    status: str
    strategy: str
    mutation: str
    code_changed: bool
    config_changes: Mapping[str, Any]  # dotted key -> value, relative to the parent
    config: Mapping[str, Any]  # the full experiment sections that ran
    metrics: Mapping[str, float]
    score: float | None = None

    @property
    def r2(self) -> float:
        value = self.metrics.get("final_r2")
        return value if value is not None and value == value else 0.0


@dataclass(frozen=True)
class Repair:
    """The previous attempt of this iteration failed: the agent gets the error to fix it."""

    attempt: int
    max_attempts: int
    proposal: Proposal
    error: str


# What each slot role (exploration.slot_roles) asks of a proposal, as agents are told it.
ROLE_MEANINGS = {
    "exploit": "one step from the best-scoring candidate parent",
    "exploit_second": "one step from the second-best candidate parent",
    "explore": "a less-visited region: a lower-ranked or little-visited parent, a key "
               "changed little so far",
    "challenge": "test a principle of memory.md: change a key it says to hold, or step "
                 "against the direction it says helps",
}


@dataclass(frozen=True)
class InFlight:
    """A proposal of another slot that is not finished yet (waiting for review, applied or
    training): a parallel proposal should not repeat it."""

    iteration: int
    slot: int
    parent_id: int | None
    mutation: str
    config_changes: Mapping[str, Any]  # dotted key -> new value, relative to its parent
    code_change: str | None  # the described code change, None for a config-only proposal
    status: str  # "review", "pending" or "running"
    role: str | None = None


@dataclass(frozen=True)
class AgentContext:
    """Everything the agent sees for one iteration. Log text inside is untrusted data."""

    iteration: int
    block: int
    iteration_in_block: int
    block_size: int
    block_end: bool
    instructions: str
    memory: str
    score_table: str
    config: ExperimentConfig
    nodes: tuple[NodeSummary, ...]
    candidates: tuple[int, ...]  # candidate parents, best score first
    latest_log_tail: str = ""
    rejections: tuple[str, ...] = ()
    repair: Repair | None = None
    read_file: Callable[[int | None, str], str] = field(default=lambda node, path: "")
    attempt: int | None = None  # the loop's attempt number for this iteration, when it knows it
    slot: int = 1  # which of the run's `slots` this proposal runs in
    slots: int = 1
    # what this slot is asked for (exploration.slot_roles): exploit, exploit_second, explore,
    # challenge (a principle of memory.md); None: the protocol's own choice
    role: str | None = None
    in_flight: tuple[InFlight, ...] = ()  # the other slots' unfinished proposals
    # A/B tests of code nodes by node: `ΔR² +0.0210 [+0.0110, +0.0310] over 3 seeds, noise
    # 0.0040: helped` (engine.ab); a code node withheld as a parent has one that did not help
    ab_tests: Mapping[int, str] = field(default_factory=dict)

    def node(self, node_id: int) -> NodeSummary:
        return next(n for n in self.nodes if n.id == node_id)


@dataclass(frozen=True)
class AgentReply:
    proposal: Proposal
    reasoning: str
    cost_usd: float = 0.0


class AgentPaused(Exception):
    """The agent cannot go on until a human acts (spend limit, budget cap, refused key): the
    loop pauses the run durably with `reason` and waits for a resume."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class AgentGaveUp(Exception):
    """The agent got no usable proposal within its bounded re-asks: the loop skips the
    iteration. `raw` is the last raw answer (also stored in the journal)."""

    def __init__(self, reason: str, raw: Any = None):
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


class Agent(Protocol):
    name: str

    async def propose(self, context: AgentContext) -> AgentReply:
        """Return one proposal for this iteration."""
        ...
