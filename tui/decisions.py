"""`proctor approve` and `proctor reject`: decide a proposal a run waits on now.

A decision names the proposal's id, so the engine applies it to that proposal only: a
decision is never held for a later one. With nothing waiting, with `--proposal` naming one
that does not wait, or without `--proposal` while several wait (one per slot), nothing is
sent (exit 2), and the message gives the command for each proposal that waits."""

from __future__ import annotations

import time
from pathlib import Path

from engine import events
from engine.journal import Step
from engine.review import Review, waiting_reviews
from tui.activity import EngineState, RunActivity, decide_command, read_activity
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
        review = _the_waiting_one(activity, proposal, approve, reason)
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


def _the_waiting_one(activity: RunActivity, proposal: str | None, approve: bool,
                     reason: str) -> Review:
    """The review `proposal` names, or the one that waits; UsageError (nothing sent) when
    none waits, `proposal` does not, or several wait and `proposal` names none of them."""
    reviews = activity.reviews
    name = activity.name
    if not reviews:
        raise UsageError(f"run {name}: nothing waits for review ({activity.doing()})")
    if proposal is None and len(reviews) == 1:
        return reviews[0]
    chosen = next((review for review in reviews if review.proposal_id == proposal), None)
    if chosen is not None:
        return chosen
    if proposal is not None and len(reviews) == 1:
        raise UsageError(f"run {name}: proposal {proposal} does not wait for review; "
                         f"what waits now is {reviews[0].summary()}")
    why = (f"proposal {proposal} does not wait for review" if proposal is not None
           else "--proposal names the one to decide")
    lines = [f"run {name}: {len(reviews)} proposals wait for review, one per slot; {why}:"]
    for review in reviews:
        lines.append(f"  {review.summary()}")
        lines.append(f"    {decide_command(name, review, approve=approve, reason=reason)}")
    raise UsageError("\n".join(lines))


def _await_outcome(attached, review: Review, command_id: int, approve: bool) -> int:
    """Poll the journal (bounded) until the engine records a decision on `review`, or takes
    the command without one because something else is waiting by then."""
    journal, name = attached.reader.journal, attached.info.name
    deadline = time.monotonic() + DECISION_WAIT_S
    while True:
        taken = journal.command_consumed(command_id)
        waiting = {now.proposal_id for now in waiting_reviews(journal)}
        recorded = journal.payload(review.iteration, Step.DECISION, review.attempt)
        if recorded is not None:
            return _report(name, recorded, approve)
        if taken and review.proposal_id not in waiting:
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
