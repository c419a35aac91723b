"""`proctor approve` and `proctor reject`: decide the one proposal a run waits on now.

A decision names the proposal's id, so the engine applies it to that proposal only: a
decision is never held for a later one. With nothing waiting, or with `--proposal` naming
another one than what waits, nothing is sent (exit 2)."""

from __future__ import annotations

import time
from pathlib import Path

from engine import events
from engine.journal import Step
from engine.review import Review, waiting_review
from tui.activity import EngineState, RunActivity, read_activity
from tui.commands import open_run, say
from tui.usage import UsageError

DECISION_WAIT_S = 10.0  # how long the command waits to see the engine record the decision
POLL_S = 0.1


def decide(folder: Path, *, approve: bool, reason: str = "", proposal: str | None = None) -> int:
    """Approve (or reject with `reason`) what waits in the run at `folder`, then report what
    the engine recorded; 1 when it recorded something else or refused it."""
    with open_run(folder) as attached:
        reader = attached.reader
        reader.refresh()
        activity = read_activity(reader)
        review = _the_waiting_one(activity, proposal)
        verb = "approving" if approve else "rejecting"
        say(f"run {activity.name}: {verb} {review.summary()}" + (
            f"\n  reason: {reason}" if reason else ""))
        by = human_identity(reader.info.project_root)
        command = (events.Approve(review.proposal_id, by) if approve
                   else events.Reject(review.proposal_id, reason, by))
        command_id = attached.send(command)
        if activity.engine is not EngineState.RUNNING:
            say(f"no engine is driving run {activity.name}: the decision is kept for proposal "
                f"{review.proposal_id} only and applies when the run is resumed "
                f"(proctor resume {activity.name})")
            return 0
        return _await_outcome(attached, review, command_id, approve)


def _the_waiting_one(activity: RunActivity, proposal: str | None) -> Review:
    review = activity.review
    if review is None:
        raise UsageError(f"run {activity.name}: nothing waits for review ({activity.doing()})")
    if proposal is not None and proposal != review.proposal_id:
        raise UsageError(f"run {activity.name}: proposal {proposal} does not wait for review; "
                         f"what waits now is {review.summary()}")
    return review


def _await_outcome(attached, review: Review, command_id: int, approve: bool) -> int:
    """Poll the journal (bounded) until the engine records a decision on `review`, or takes
    the command without one because something else is waiting by then."""
    journal, name = attached.reader.journal, attached.info.name
    deadline = time.monotonic() + DECISION_WAIT_S
    while True:
        taken = journal.command_consumed(command_id)
        now = waiting_review(journal)
        recorded = journal.payload(review.iteration, Step.DECISION, review.attempt)
        if recorded is not None:
            return _report(name, recorded, approve)
        if taken and (now is None or now.proposal_id != review.proposal_id):
            say(f"run {name}: the engine took the decision but recorded none for proposal "
                f"{review.proposal_id} (it no longer waits); see `proctor status {name}`")
            return 1
        if not attached.reader.engine_running():
            say(f"run {name}: its engine stopped before deciding; the decision is kept for "
                f"proposal {review.proposal_id} only (proctor resume {name})")
            return 0
        if time.monotonic() > deadline:
            say(f"run {name}: the engine has not recorded the decision within "
                f"{DECISION_WAIT_S:.0f} s ({'taken' if taken else 'not taken yet'}); it holds "
                f"for proposal {review.proposal_id} only; `proctor status {name}` shows it")
            return 0
        time.sleep(POLL_S)


def _report(name: str, recorded: dict, approve: bool) -> int:
    verdict = "approved" if recorded.get("approved") else "rejected"
    by = recorded.get("approver") or recorded.get("by") or "a human"
    why = f": {recorded['reason']}" if recorded.get("reason") else ""
    if bool(recorded.get("approved")) == approve:
        say(f"run {name}: the engine recorded it: {verdict} by {by}{why}")
        return 0
    say(f"run {name}: a decision came first: {verdict} by {by}{why}")
    return 1


def human_identity(project_root: Path) -> str:
    """`name <email>` from the project's git config; '' when the project has no git or the
    identity is not set."""
    from engine.vcs import VcsError, find_repository, open_repo, run_git

    found = find_repository(project_root)
    if found is None:
        return ""
    values = []
    try:
        with open_repo(found[0]) as repo:
            for key in ("user.name", "user.email"):
                values.append(run_git(repo, "config", "--get", key).decode().strip())
    except VcsError:
        return ""
    name, email = values
    return f"{name} <{email}>" if name and email else ""
