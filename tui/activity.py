"""What a run is doing now, as its journal and its lock show it: whether an engine drives it,
a pause and why, the reviews a human must decide, and every unfinished iteration: its slot,
its step, where its run executes (a local slot, a Dask worker) and how far it is.

`status`, `approve`/`reject` and `resume` word their answers from this one reading; nothing
here re-derives a decision the engine made (the review and the pause are read as journaled)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engine.attach import RunPlace, RunReader
from engine.events import TrainingProgress
from engine.journal import Journal, Step
from engine.logs import LogsError, log_tail
from engine.progress import SIMULATION, latest_progress
from engine.review import Review, waiting_reviews
from engine.state import RunState

PROGRESS_TAIL_BYTES = 8192  # how much of a training log's end `status` reads for progress


class EngineState(StrEnum):
    RUNNING = "running"  # an engine process holds the run
    STOPPED = "stopped"  # the engine ended it cleanly (finished, stopped by a human)
    CRASHED = "crashed"  # no engine, and the run did not end: killed or crashed


# What an unfinished iteration does after its latest journaled step.
_AFTER_STEP: dict[str, str] = {
    Step.STARTED: "waits for the agent's proposal",
    Step.PROPOSAL_STORED: "is preparing its proposal",
    Step.REVIEW: "is applying its proposal",  # unless the review waits for a human
    Step.DECISION: "is applying its proposal",
    Step.APPLIED: "is starting its training",
    Step.RUN_STARTED: "is training",
    Step.RUN_FINISHED: "is recording its result",
}


@dataclass(frozen=True)
class InFlight:
    """An unfinished iteration: its slot, what it does, where its run executes and how far
    the run is (as far as the journal and its training log tell)."""

    iteration: int
    slot: int | None  # None: an engine before slots journaled none
    step: str | None  # what it does (see _AFTER_STEP)
    where: str | None = None  # where its run executes, once started
    pid: int = 0  # the local step's leader (0: a remote run, or none yet)
    parent_id: int | None = None
    mutation: str = ""
    progress: TrainingProgress | None = None

    def describe(self) -> str:
        """`iteration 7 · slot 2 · local slot 2 (pid 4242) · node 7 <- 3: lr 1e-3 · training
        300/2000 steps`."""
        parts = [f"iteration {self.iteration}"]
        if self.slot is not None:
            parts.append(f"slot {self.slot}")
        if self.where:
            parts.append(self.where + (f" (pid {self.pid})" if self.pid else ""))
        if self.mutation or self.parent_id is not None:
            parent = "root" if self.parent_id is None else str(self.parent_id)
            parts.append(f"node {self.iteration} <- {parent}: {self.mutation or '-'}")
        parts.append(self.doing())
        return " · ".join(parts)

    def doing(self) -> str:
        """`training 300/2000 steps`, `simulating 40/200 frames`, or its step in words."""
        progress = self.progress
        if progress is None:
            return self.step or "has started"
        if progress.phase == SIMULATION:
            return f"simulating {progress.step}/{progress.total} frames"
        return f"training {progress.step}/{progress.total} steps"

    def to_dict(self) -> dict[str, Any]:
        progress = self.progress
        return {"iteration": self.iteration, "slot": self.slot, "step": self.step,
                "where": self.where, "pid": self.pid, "node": self.iteration,
                "parent": self.parent_id, "mutation": self.mutation,
                "progress": None if progress is None else {
                    "phase": progress.phase, "step": progress.step, "total": progress.total}}


@dataclass(frozen=True)
class RunActivity:
    name: str
    engine: EngineState
    stopped: str | None  # why the run ended (EngineState.STOPPED)
    paused: str | None  # the journaled pause reason
    review: Review | None  # the oldest review waiting for a human decision now
    iteration: int | None  # the oldest unfinished iteration
    step: str | None  # what that iteration does (see _AFTER_STEP)
    slots: int = 1  # exploration.parallel
    reviews: tuple[Review, ...] = ()  # every review waiting, oldest first (one per slot)
    in_flight: tuple[InFlight, ...] = ()  # every unfinished iteration, oldest first

    def doing(self) -> str:
        """A clause on what the run does: `iteration 6 is training`, `paused: ...`."""
        if self.engine is EngineState.RUNNING and self.paused is not None:
            return f"paused: {self.paused}"
        return self.progress()

    def progress(self) -> str:
        """Who drives the run and where its iterations are (a pause aside)."""
        if self.engine is EngineState.STOPPED:
            words = f"stopped ({self.stopped})"
        elif self.engine is EngineState.CRASHED:
            words = "no engine drives it (it crashed or was killed)"
        elif len(self.in_flight) > 1:
            waiting = f", {len(self.reviews)} waiting for review" if self.reviews else ""
            return (f"driven by an engine; {len(self.in_flight)} of {self.slots} slots busy"
                    f"{waiting}")
        elif self.review is not None:
            return f"driven by an engine; iteration {self.review.iteration} waits for review"
        elif self.iteration is not None:
            return (f"driven by an engine; iteration {self.iteration} "
                    f"{self.step or 'has started'}")
        else:
            return "driven by an engine, between iterations"
        numbers = [flight.iteration for flight in self.in_flight]
        if len(numbers) > 1:
            unfinished = f"; iterations {', '.join(map(str, numbers))} are unfinished"
        else:
            unfinished = f"; iteration {self.iteration} is unfinished" if self.iteration else ""
        return f"{words}{unfinished}; `proctor resume {self.name}` continues it"

    def decide_commands(self, review: Review | None = None) -> tuple[str, str]:
        """The approve and reject command lines of `review` (default: the oldest waiting)."""
        review = review or self.review
        assert review is not None
        return (decide_command(self.name, review, approve=True),
                decide_command(self.name, review, approve=False))

    def review_dict(self, review: Review) -> dict[str, Any]:
        """A waiting review as `status --json` gives it, with its commands."""
        approve, reject = self.decide_commands(review)
        return {**review.to_dict(), "summary": review.summary(), "approve": approve,
                "reject": reject}

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.name, "engine": self.engine.value, "stopped": self.stopped,
                "paused": self.paused,
                "resume": f"proctor resume {self.name}" if self.paused is not None else None,
                "iteration": self.iteration, "step": self.step,
                "review": self.review_dict(self.review) if self.review is not None else None,
                "slots": self.slots,
                "reviews": [self.review_dict(review) for review in self.reviews],
                "in_flight": [flight.to_dict() for flight in self.in_flight]}


_ECHOED_REASON = 200  # characters of a reason a suggested command repeats


def decide_command(run: str, review: Review, *, approve: bool, reason: str = "") -> str:
    """The command line that approves (or rejects, with `reason`) `review` and no other."""
    pick = f"proctor {'approve' if approve else 'reject'} {run} --proposal {review.proposal_id}"
    if approve:
        return pick
    # a long reason is the user's own text: echoing it whole would bury the command
    text = shlex.quote(reason) if reason and len(reason) <= _ECHOED_REASON else "TEXT"
    return f"{pick} --reason {text}"


def read_activity(reader: RunReader) -> RunActivity:
    """The run's activity now; `reader` must have been refreshed (its `stopped`)."""
    journal = reader.journal
    if reader.engine_running():
        engine = EngineState.RUNNING
    else:
        engine = EngineState.STOPPED if reader.stopped is not None else EngineState.CRASHED
    reviews = waiting_reviews(journal)
    flights = tuple(_in_flight(reader, iteration, reviews)
                    for iteration in journal.unfinished_iterations())
    oldest = flights[0] if flights else None
    review = reviews[0] if reviews else None
    step = oldest.step if oldest is not None else None
    return RunActivity(
        name=reader.info.name, engine=engine, stopped=reader.stopped,
        paused=RunState(journal).paused, review=review,
        iteration=oldest.iteration if oldest is not None else None,
        step="waits for review" if review is not None else step,
        slots=reader.info.config.exploration.parallel, reviews=tuple(reviews),
        in_flight=flights,
    )


def _in_flight(reader: RunReader, iteration: int, reviews: list[Review]) -> InFlight:
    """What the unfinished `iteration` does, from its journaled steps (and, while it trains,
    the end of its training log)."""
    journal = reader.journal
    last = journal.last_step(iteration)
    step = _AFTER_STEP.get(last.step) if last is not None else None
    if any(review.iteration == iteration for review in reviews):
        step = "waits for review"
    parent, mutation = _node_of(journal, iteration)
    placed = _placement(journal, iteration)
    if placed is None:
        slot = (journal.payload(iteration, Step.STARTED) or {}).get("slot")
        return InFlight(iteration, slot if isinstance(slot, int) else None, step,
                        parent_id=parent, mutation=mutation)
    training = last is not None and last.step == Step.RUN_STARTED
    return InFlight(iteration, placed.slot, step, placed.where, placed.pid, parent, mutation,
                    _progress(reader, iteration) if training else None)


def _node_of(journal: Journal, iteration: int) -> tuple[int | None, str]:
    """The parent and mutation of `iteration`'s node (applied), or of its latest proposal."""
    node = (journal.payload(iteration, Step.APPLIED) or {}).get("node")
    if isinstance(node, dict):
        return node.get("parent_id"), str(node.get("mutation") or "")
    review = journal.payload(iteration, Step.REVIEW)
    if review is not None:
        return review.get("parent_id"), str(review.get("mutation") or "")
    return None, ""


def _placement(journal: Journal, iteration: int) -> RunPlace | None:
    """Where `iteration`'s run executes: as the engine keeps it while the run goes (the
    journal's active runs), else as its latest `run_started` step says."""
    payload = journal.payload(iteration, Step.RUN_STARTED)
    if payload is None:
        return None
    place = RunPlace.of(payload)
    active = RunState(journal).active_runs.get(iteration)
    if active is not None:
        return RunPlace(int(active.get("slot", place.slot)),
                        str(active.get("where") or place.where), place.pid)
    return place


def _progress(reader: RunReader, iteration: int) -> TrainingProgress | None:
    """How far the run of `iteration` is, from the last lines of its training log."""
    try:
        tail = log_tail(reader.paths.training_log(iteration), PROGRESS_TAIL_BYTES,
                        head_lines=0, tail_lines=40)
    except LogsError:
        return None
    return latest_progress(iteration, tail.splitlines())
