"""Which iteration holds which slot, and what each one in flight is doing.

With `exploration.parallel: k` the loop keeps up to k iterations in flight; each holds the
lowest slot free when it started (its executor slot, its role) until it is recorded, and the
agent asked for another slot's proposal is shown what the others hold."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from engine.agents.base import InFlight
from engine.attempt import Attempt
from engine.config import Exploration


@dataclass
class Flight:
    """One iteration in flight: the slot it holds, and its current attempt once proposed."""

    iteration: int
    slot: int
    role: str | None
    attempt: Attempt | None = None
    phase: str = "proposing"  # proposing, review, pending (approved), running, ab (its test)


class Slots:
    """The k slots of a run and the flights holding them."""

    def __init__(self, count: int, exploration: Exploration):
        self.count = count
        self.exploration = exploration
        self._flights: dict[int, Flight] = {}

    def __iter__(self) -> Iterator[Flight]:
        return iter(sorted(self._flights.values(), key=lambda flight: flight.iteration))

    def __len__(self) -> int:
        return len(self._flights)

    def free(self) -> int:
        """The lowest free slot (there must be one)."""
        busy = {flight.slot for flight in self._flights.values()}
        return min(set(range(1, self.count + 1)) - busy)

    def take(self, iteration: int, slot: int) -> Flight:
        flight = self._flights[iteration] = Flight(iteration, slot,
                                                   self.exploration.slot_role(slot))
        return flight

    def release(self, iteration: int) -> None:
        self._flights.pop(iteration, None)

    def beyond(self, last: int) -> int:
        """How many flights are past iteration `last` (nodes humans asked for)."""
        return sum(1 for iteration in self._flights if iteration > last)

    def others(self, asking: Flight) -> tuple[InFlight, ...]:
        """The other slots' proposals that have not finished, for an agent's context."""
        others = []
        for flight in self:
            attempt = flight.attempt
            if flight is asking or attempt is None:
                continue
            proposal = attempt.proposal
            code = proposal.code_change.change if proposal.code_change is not None else \
                ((proposal.mutation or "code edits") if proposal.edits else None)
            others.append(InFlight(flight.iteration, flight.slot, proposal.parent_id,
                                   proposal.mutation, dict(proposal.config_changes), code,
                                   flight.phase, flight.role))
        return tuple(others)
