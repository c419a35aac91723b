"""What the app knows about the run, folded from engine events (no Textual in here).

`RunState.apply(event)` updates the model and returns the notices worth telling the human
(a proposal waiting, a manual edit, an error). The views read the state; they never fold
events themselves.

With `exploration.parallel: k` several iterations are in flight at once and their events
interleave: each slot's run is a `SlotRun` (an iteration maps to its slot through
TrainingStarted), and every iteration keeps its own proposal, so a review waiting in one
slot never hides another slot's training. The top-level fields (iteration, phase, node, ...)
follow the latest event, which is the whole story when k = 1."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from engine import events as ev
from engine.progress import SIMULATION, TRAINING
from engine.proposal import Proposal

Severity = Literal["information", "warning", "error"]


class Phase(StrEnum):
    STARTING = "starting"
    PROPOSING = "agent proposing"
    REVIEWING = "waiting for review"
    APPLYING = "applying"
    SIMULATING = "simulating the dataset"
    TRAINING = "training"
    RECORDING = "recording"
    PAUSED = "paused"
    FINISHED = "finished"


@dataclass(frozen=True)
class Notice:
    """Something to tell the human (a toast; `bell` rings the terminal bell too)."""

    message: str
    severity: Severity = "information"
    title: str = ""
    bell: bool = False


@dataclass
class Review:
    """The proposal the engine shows (and, when `awaiting`, waits on)."""

    iteration: int
    proposal: Proposal
    diff: str
    config_diff: str
    awaiting: bool
    serial: int = 0  # counts proposals: an identical re-proposal is still a new one
    proposal_id: str = ""  # what a decision names: the engine refuses it for any other
    stale_paths: list[str] = field(default_factory=list)
    edit_error: str | None = None  # the human's edited version was refused

    @property
    def key(self) -> int:
        return self.serial

    def named_by(self, iteration: int, proposal_id: str) -> bool:
        """Whether an event naming `proposal_id` (or, from an engine that names none, only
        `iteration`) is about this proposal."""
        if proposal_id and self.proposal_id:
            return proposal_id == self.proposal_id
        return iteration == self.iteration  # an engine that names no proposal


@dataclass
class SlotRun:
    """The run a slot holds now, or held last (`status` set once it finished)."""

    slot: int
    where: str
    iteration: int
    node_id: int
    parent_id: int | None
    mutation: str
    strategy: str = ""
    hypothesis: str = ""
    step: int = 0
    steps: int = 0
    progress_phase: str = TRAINING
    status: str | None = None  # the node's status once its run finished ("done", "failed")
    r2: float | None = None

    @property
    def running(self) -> bool:
        return self.status is None


@dataclass(frozen=True)
class ManualEdit:
    path: str
    diff: str
    where: str


def finite(value: float | None) -> float | None:
    return value if isinstance(value, int | float) and math.isfinite(value) else None


@dataclass
class RunState:
    """The run as the events told it."""

    run: str = ""
    run_dir: str = ""
    total_iterations: int = 0
    iteration: int = 0
    block: int = 0
    phase: Phase = Phase.STARTING
    node_id: int | None = None
    parent_id: int | None = None
    strategy: str = ""
    mutation: str = ""
    hypothesis: str = ""
    step: int = 0
    steps: int = 0
    progress_phase: str = TRAINING  # what `step` counts: simulated frames or training steps
    best_r2: float | None = None
    last_r2: float | None = None
    reviews: dict[int, Review] = field(default_factory=dict)  # each iteration's latest proposal
    slots: tuple[str, ...] = ()  # where each slot runs, slot 1 first (RunOpened)
    slot_runs: dict[int, SlotRun] = field(default_factory=dict)  # slot -> its latest run
    in_flight: set[int] = field(default_factory=set)  # iterations started, not yet finished
    manual_edits: dict[str, ManualEdit] = field(default_factory=dict)
    paused: str | None = None
    sandbox_missing: tuple[str, ...] = ()
    finished: ev.RunFinished | None = None
    last_error: str | None = None
    events_seen: int = 0
    proposals_seen: int = 0

    @property
    def slot_count(self) -> int:
        """How many slots the run has (1 for an engine that names none)."""
        return max(1, len(self.slots))

    @property
    def busy_slots(self) -> int:
        """Slots holding an iteration now (proposing, waiting for review or training)."""
        return min(self.slot_count, len(self.in_flight))

    @property
    def waiting_reviews(self) -> list[Review]:
        """Every proposal a human must decide on now, oldest iteration first."""
        return [self.reviews[i] for i in sorted(self.reviews) if self.reviews[i].awaiting]

    @property
    def waiting_review(self) -> Review | None:
        """The oldest proposal a human must decide on now, if any."""
        waiting = self.waiting_reviews
        return waiting[0] if waiting else None

    @property
    def review(self) -> Review | None:
        """The proposal to show when the human picked none: the oldest waiting one, else the
        latest one made."""
        waiting = self.waiting_review
        if waiting is not None or not self.reviews:
            return waiting
        return max(self.reviews.values(), key=lambda review: review.serial)

    def held_before_training(self, slot: int, unfinished_slots: dict[int, int]) -> int | None:
        """The iteration `slot` holds while no run goes there (the agent proposing, a review
        waiting), by the slots the journal says unfinished iterations started in."""
        run = self.slot_runs.get(slot)
        if run is not None and run.running:
            return None
        held = [iteration for iteration, where in unfinished_slots.items()
                if where == slot and iteration in self.in_flight
                and (run is None or iteration != run.iteration)]
        return max(held, default=None)

    def before_training(self, iteration: int) -> str:
        """What an iteration whose run has not started does: proposing, waiting, applying."""
        review = self.reviews.get(iteration)
        if review is None:
            return str(Phase.PROPOSING)
        return str(Phase.REVIEWING if review.awaiting else Phase.APPLYING)

    def slot_of(self, iteration: int) -> int | None:
        """The slot whose latest run is `iteration`'s (None before its training started)."""
        for slot, run in self.slot_runs.items():
            if run.iteration == iteration:
                return slot
        return None

    def apply(self, event: ev.Event) -> list[Notice]:
        """Fold one event; returns what to tell the human about it."""
        self.events_seen += 1
        match event:
            case ev.RunOpened(run=run, run_dir=run_dir, total_iterations=total,
                              sandbox_missing=missing, slots=slots):
                self.run, self.run_dir, self.total_iterations = run, run_dir, total
                self.slots = slots
                self.finished = None
                self.sandbox_missing = missing
                if missing:
                    return [Notice("; ".join(missing), "warning",
                                   "Runs are less isolated here (proctor doctor)")]
            case ev.IterationStarted(iteration=iteration, block=block, total_iterations=total):
                self.iteration, self.block, self.total_iterations = iteration, block, total
                self.phase = Phase.PROPOSING
                self.step = self.steps = 0
                # a new iteration: proposals of iterations that ended are history
                self.reviews = {i: r for i, r in self.reviews.items()
                                if (r.awaiting or i in self.in_flight) and i != iteration}
                self.in_flight.add(iteration)
                self.finished = None
            case ev.ProposalReady(iteration=iteration, proposal=proposal, diff=diff,
                                  config_diff=config_diff, awaiting_review=awaiting,
                                  proposal_id=proposal_id):
                self.iteration, self.node_id = iteration, iteration  # a node's id: its iteration
                self.proposals_seen += 1
                self.reviews[iteration] = Review(iteration, proposal, diff, config_diff,
                                                 awaiting, self.proposals_seen, proposal_id)
                self.parent_id, self.strategy = proposal.parent_id, str(proposal.strategy)
                self.mutation = proposal.mutation or config_diff.replace("\n", "; ")
                self.hypothesis = proposal.hypothesis
                if awaiting:
                    self.phase = Phase.REVIEWING
            case ev.ProposalDecided(iteration=iteration, approved=approved, reason=reason,
                                    by=by, proposal_id=proposal_id):
                review = self.reviews.get(iteration)
                if review is not None and review.named_by(iteration, proposal_id):
                    review.awaiting = False
                self.phase = Phase.APPLYING if approved else Phase.PROPOSING
                if by != "policy" and not approved:
                    return [Notice(f"iteration {iteration}: rejected ({reason})", title=by)]
            case ev.ProposalInvalid(iteration=iteration, error=error, attempt=attempt):
                return [Notice(f"iteration {iteration}: invalid proposal (try {attempt}): "
                               f"{_first_line(error)}", "warning")]
            case ev.TrainingStarted(iteration=iteration, node_id=node_id, parent_id=parent,
                                    mutation=mutation):
                self.iteration, self.node_id, self.parent_id = iteration, node_id, parent
                self.mutation = mutation or self.mutation
                self.phase = Phase.TRAINING
                self.step = self.steps = 0
                self.progress_phase = TRAINING
                self._start_slot(event)
            case ev.TrainingProgress(iteration=iteration, step=step, total=total, phase=phase):
                if iteration == self.iteration:  # a late update of a finished run is stale
                    self.step, self.steps, self.progress_phase = step, total, phase
                    self.phase = Phase.SIMULATING if phase == SIMULATION else Phase.TRAINING
                run = self.slot_runs.get(self.slot_of(iteration) or 0)
                if run is not None and run.running:
                    run.step, run.steps, run.progress_phase = step, total, phase
            case ev.NodeFinished(iteration=iteration, node_id=node_id, status=status,
                                 metrics=metrics, error=error, best_r2=best):
                self.phase = Phase.RECORDING
                self.last_r2 = finite(metrics.get("final_r2"))
                self.in_flight.discard(iteration)
                run = self.slot_runs.get(self.slot_of(iteration) or 0)
                if run is not None:
                    run.status, run.r2 = status, self.last_r2
                best = finite(best)
                if best is not None:
                    self.best_r2 = best if self.best_r2 is None else max(self.best_r2, best)
                if status != "done":
                    return [Notice(f"node {node_id} {status}: {_first_line(error or '')}",
                                   "warning")]
            case ev.IterationSkipped(iteration=iteration, reason=reason):
                self.in_flight.discard(iteration)
                return [Notice(f"iteration {iteration} skipped: {_first_line(reason)}",
                               "warning")]
            case ev.Paused(reason=reason):
                self.paused, self.phase = reason, Phase.PAUSED
                return [Notice(f"run paused: {reason}", "warning")]
            case ev.Resumed():
                self.paused = None
                self.phase = Phase.PROPOSING
            case ev.EngineError(message=message):
                self.last_error = message
                return [Notice(message, "error", title="engine")]
            case ev.RunFinished(reason=reason, best_node=best_node, best_r2=best):
                self.finished, self.phase = event, Phase.FINISHED
                self.reviews.clear()
                self.in_flight.clear()
                best = finite(best)
                if best is not None:
                    self.best_r2 = best
                where = f"; best node {best_node}" if best_node is not None else ""
                return [Notice(f"run finished: {reason}{where}", title="run")]
        return self._apply_human_events(event)

    def _start_slot(self, event: ev.TrainingStarted) -> None:
        """The slot of `event` now runs its node (with the strategy its proposal named)."""
        slot = event.slot if 1 <= event.slot <= self.slot_count else 1
        proposal = self.reviews.pop(event.iteration, None)
        where = event.where or (self.slots[slot - 1] if slot <= len(self.slots) else "")
        run = SlotRun(slot, where, event.iteration, event.node_id, event.parent_id,
                      event.mutation)
        if proposal is not None:
            run.strategy = str(proposal.proposal.strategy)
            run.hypothesis = proposal.proposal.hypothesis
            run.mutation = run.mutation or proposal.proposal.mutation
        self.slot_runs[slot] = run

    def _apply_human_events(self, event: ev.Event) -> list[Notice]:
        """Events about what humans do to the code (manual edits, reverts, edited versions)."""
        match event:
            case ev.ManualEditDetected(path=path, diff=diff, where=where):
                self.manual_edits[path] = ManualEdit(path, diff, where)
                return [Notice(f"manual edit of {path} ({where}) detected: review tab, "
                               "m adopts, i ignores", "warning", title="manual edit")]
            case ev.ManualEditResolved(path=path, adopted=adopted, node_id=node_id):
                if path is None:
                    self.manual_edits.clear()
                else:
                    self.manual_edits.pop(path, None)
                what = f"adopted as node {node_id}" if adopted else "ignored"
                return [Notice(f"manual edit {path or '(all)'} {what}")]
            case ev.ProposalStale(iteration=iteration, path=path):
                review = self.reviews.get(iteration)
                if review is not None:
                    review.stale_paths.append(path)
                return [Notice(f"the proposal of iteration {iteration} edits {path}, which a "
                               "human changed meanwhile", "warning", title="stale proposal")]
            case ev.EditedVersionInvalid(iteration=iteration, error=error):
                review = self.reviews.get(iteration)
                if review is not None:
                    review.edit_error = error
                    review.awaiting = True
                    self.phase = Phase.REVIEWING
                return [Notice(f"your edited version was refused: {_first_line(error)}",
                               "error", title=f"iteration {iteration}")]
            case ev.NodeReverted(node_id=node_id, reverted_id=reverted):
                return [Notice(f"node {node_id} reverts the code of node {reverted}")]
            case ev.PolicyViolation(iteration=iteration, error=error):
                return [Notice(f"iteration {iteration}: policy violation: {_first_line(error)}",
                               "warning")]
        return []


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines and lines[0].startswith("Traceback") else (lines[0] if lines
                                                                         else "")
