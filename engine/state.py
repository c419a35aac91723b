"""The run's durable flags in the journal's `state` table, read and written by name.

Every key the engine keeps between steps is a typed accessor here, so a misspelt key is an
AttributeError, not a flag that silently reads as unset; viewers read the same accessors."""

from __future__ import annotations

from typing import Any

from engine.journal import Journal

PAUSED = "paused"
ACTIVE_RUN = "active_run"  # one run in flight, as engines before slots journaled it
ACTIVE_RUNS = "active_runs"
HUMAN_QUEUE = "human_queue"
STALE_PROPOSAL = "stale_proposal"
POLICY_VIOLATIONS = "policy_violations"
SANDBOX_MISSING = "sandbox_missing"
NOISE_FLOOR = "noise_floor"  # the spread of R² over seeds of one config (engine.ab)
SLOTS = "slots"  # where each slot runs, as the engine's executor describes it
DO_NOT_RETRY = "do_not_retry"
UNLOGGED = "unlogged"
MANUAL_EDITS = "manual_edits"  # humans' edits of editable files, awaiting adopt or ignore
CHECKOUT_SEEN = "checkout_seen"  # the checkout's editable files as proctor last saw them
AGENT_COST = "agent_cost"  # the Claude agent's ledger: calls, usage, usd_total
AGENT_BUDGET = "agent_budget_usd"  # a human's raised budget, over the config's


class RunState:
    """Typed access to one run's durable flags (a setter given None or empty deletes)."""

    def __init__(self, journal: Journal):
        self.journal = journal

    def _list(self, key: str) -> list[Any]:
        value = self.journal.state(key, [])
        return list(value) if isinstance(value, list) else []

    def _set_list(self, key: str, items: list[Any]) -> None:
        self.journal.set_state(key, list(items) or None)

    @property
    def paused(self) -> str | None:
        """Why the run is paused (None: it is not)."""
        value = self.journal.state(PAUSED)
        return str(value) if value is not None else None

    @paused.setter
    def paused(self, reason: str | None) -> None:
        self.journal.set_state(PAUSED, reason)

    @property
    def active_run(self) -> dict[str, Any] | None:
        """The identity of the process tree of the step that runs now (`ProcessIdentity`)."""
        value = self.journal.state(ACTIVE_RUN)
        return value if isinstance(value, dict) else None

    @active_run.setter
    def active_run(self, identity: dict[str, Any] | None) -> None:
        self.journal.set_state(ACTIVE_RUN, identity)

    @property
    def active_runs(self) -> dict[int, dict[str, Any]]:
        """Runs in flight by iteration: `{"slot", "where", "record"}`, `record` being what
        the executor needs to find the run again (`engine.executors.Placement.record`)."""
        value = self.journal.state(ACTIVE_RUNS)
        runs = {int(key): item for key, item in value.items() if isinstance(item, dict)} \
            if isinstance(value, dict) else {}
        legacy = self.active_run
        if legacy is not None and not runs:
            runs[0] = {"slot": 1, "where": "local slot 1", "record": {"kind": "local", **legacy}}
        return runs

    def set_active_run(self, iteration: int, placement: dict[str, Any] | None) -> None:
        """Record (or with None forget) where `iteration`'s run executes."""
        runs = self.active_runs
        runs.pop(0, None)
        if placement is None:
            runs.pop(iteration, None)
        else:
            runs[iteration] = placement
        self.journal.set_state(ACTIVE_RUNS, {str(key): item for key, item in runs.items()}
                               or None)
        if self.active_run is not None:
            self.active_run = None

    @property
    def human_queue(self) -> list[dict[str, Any]]:
        """Nodes humans asked for (`HumanChange` records), oldest first."""
        return self._list(HUMAN_QUEUE)

    @human_queue.setter
    def human_queue(self, items: list[dict[str, Any]]) -> None:
        self._set_list(HUMAN_QUEUE, items)

    @property
    def stale_proposal(self) -> dict[str, Any] | None:
        """`{"iteration": N, "paths": [...]}`: files a human edited under a waiting proposal."""
        value = self.journal.state(STALE_PROPOSAL)
        return value if isinstance(value, dict) else None

    @stale_proposal.setter
    def stale_proposal(self, value: dict[str, Any] | None) -> None:
        self.journal.set_state(STALE_PROPOSAL, value)

    @property
    def policy_violations(self) -> list[dict[str, Any]]:
        return self._list(POLICY_VIOLATIONS)

    @policy_violations.setter
    def policy_violations(self, items: list[dict[str, Any]]) -> None:
        self._set_list(POLICY_VIOLATIONS, items)

    @property
    def sandbox_missing(self) -> tuple[str, ...]:
        """The sandbox layers this machine lacks, and why (shown by every viewer)."""
        return tuple(str(item) for item in self._list(SANDBOX_MISSING))

    @sandbox_missing.setter
    def sandbox_missing(self, layers: tuple[str, ...]) -> None:
        self.journal.set_state(SANDBOX_MISSING, list(layers))

    @property
    def noise_floor(self) -> float | None:
        """The run's noise floor, once an A/B test measured it."""
        value = self.journal.state(NOISE_FLOOR)
        return float(value) if isinstance(value, int | float) else None

    @noise_floor.setter
    def noise_floor(self, value: float | None) -> None:
        self.journal.set_state(NOISE_FLOOR, value)

    @property
    def slots(self) -> tuple[str, ...]:
        """Where each slot runs, slot 1 first ("local slot 2 on GPU 1", ...); empty before an
        engine with slots opened the run."""
        return tuple(str(item) for item in self._list(SLOTS))

    @slots.setter
    def slots(self, names: tuple[str, ...]) -> None:
        self.journal.set_state(SLOTS, list(names))

    @property
    def do_not_retry(self) -> list[str]:
        """proctor's own notes on failed code changes, kept in memory.md whatever the agent
        writes there."""
        return [str(item) for item in self._list(DO_NOT_RETRY)]

    @do_not_retry.setter
    def do_not_retry(self, notes: list[str]) -> None:
        self._set_list(DO_NOT_RETRY, notes)

    @property
    def unlogged(self) -> list[int]:
        """Finished nodes whose analysis entry waits for the next proposal."""
        return [int(item) for item in self._list(UNLOGGED)]

    @unlogged.setter
    def unlogged(self, node_ids: list[int]) -> None:
        self._set_list(UNLOGGED, node_ids)

    @property
    def manual_edits(self) -> list[dict[str, Any]]:
        """Pending human edits (`engine.watch.ManualEdit` records)."""
        return [item for item in self._list(MANUAL_EDITS) if isinstance(item, dict)]

    @property
    def agent_spent_usd(self) -> float | None:
        """What the agent has spent on this run so far (None: it keeps no ledger)."""
        ledger = self.journal.state(AGENT_COST)
        if not isinstance(ledger, dict):
            return None
        return float(ledger.get("usd_total", 0.0))

    def record_policy_violation(self, iteration: int, attempt: int, error: str,
                                at: float) -> None:
        """An edit that tried to leave the whitelist (once per attempt)."""
        violations = self.policy_violations
        if (iteration, attempt) not in [(v.get("iteration"), v.get("attempt"))
                                        for v in violations]:
            self.policy_violations = [*violations, {"iteration": iteration, "attempt": attempt,
                                                    "error": error, "at": at}]
