"""What a run is doing now, as its journal and its lock show it: whether an engine drives it,
a pause and why, the review a human must decide, the step of the unfinished iteration.

`status`, `approve`/`reject` and `resume` word their answers from this one reading; nothing
here re-derives a decision the engine made (the review and the pause are read as journaled)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engine.attach import RunReader
from engine.journal import Step
from engine.review import Review, waiting_review
from engine.state import RunState


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
class RunActivity:
    name: str
    engine: EngineState
    stopped: str | None  # why the run ended (EngineState.STOPPED)
    paused: str | None  # the journaled pause reason
    review: Review | None  # what waits for a human decision now
    iteration: int | None  # the unfinished iteration
    step: str | None  # what that iteration does (see _AFTER_STEP)

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
        elif self.review is not None:
            return f"driven by an engine; iteration {self.review.iteration} waits for review"
        elif self.iteration is not None:
            return (f"driven by an engine; iteration {self.iteration} "
                    f"{self.step or 'has started'}")
        else:
            return "driven by an engine, between iterations"
        unfinished = f"; iteration {self.iteration} is unfinished" if self.iteration else ""
        return f"{words}{unfinished}; `proctor resume {self.name}` continues it"

    def decide_commands(self) -> tuple[str, str]:
        """The approve and reject command lines of the waiting review."""
        assert self.review is not None
        pick = f"{self.name} --proposal {self.review.proposal_id}"
        return f"proctor approve {pick}", f"proctor reject {pick} --reason TEXT"

    def to_dict(self) -> dict[str, Any]:
        review = None
        if self.review is not None:
            approve, reject = self.decide_commands()
            review = {**self.review.to_dict(), "summary": self.review.summary(),
                      "approve": approve, "reject": reject}
        return {"run": self.name, "engine": self.engine.value, "stopped": self.stopped,
                "paused": self.paused,
                "resume": f"proctor resume {self.name}" if self.paused is not None else None,
                "iteration": self.iteration, "step": self.step, "review": review}


def read_activity(reader: RunReader) -> RunActivity:
    """The run's activity now; `reader` must have been refreshed (its `stopped`)."""
    journal = reader.journal
    if reader.engine_running():
        engine = EngineState.RUNNING
    else:
        engine = EngineState.STOPPED if reader.stopped is not None else EngineState.CRASHED
    iteration = journal.unfinished_iteration()
    last = journal.last_step(iteration) if iteration is not None else None
    review = waiting_review(journal)
    step = _AFTER_STEP.get(last.step) if last is not None else None
    return RunActivity(
        name=reader.info.name, engine=engine, stopped=reader.stopped,
        paused=RunState(journal).paused, review=review, iteration=iteration,
        step="waits for review" if review is not None else step,
    )
