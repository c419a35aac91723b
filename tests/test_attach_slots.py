"""Attaching to a run with several slots (journal written by hand, tests/slot_journal.py):
the attached source names the slots, places each run in its slot, and tails every running
node's log at once; the attached app shows each slot's log and both waiting reviews."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from slot_journal import WAITING, WORKER, write_slot_run
from textual.widgets import Static
from waiting import until

from engine import events as ev
from engine.attach import AttachedRun
from engine.journal import Journal, Step
from engine.paths import RunPaths
from tui.app import attached_app
from tui.settings import TuiSettings

HERE = Path(__file__).resolve().parent
QUIET = TuiSettings(watch_files=False, show_clock=False, bell=False, toasts=False,
                    journal_poll_s=0.05)


@pytest.fixture
def slot_run(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(HERE / "fakeproject", root,
                    ignore=shutil.ignore_patterns("__pycache__", "log"))
    return write_slot_run(root)


def lines_of(events: list[ev.Event], iteration: int) -> list[str]:
    return [line for event in events if isinstance(event, ev.LogLines)
            and event.iteration == iteration for line in event.lines]


def test_the_attached_source_places_each_run_in_its_slot_and_tails_every_log(slot_run):
    attached = AttachedRun(slot_run)
    try:
        events = attached.poll()
        opened = events[0]
        assert isinstance(opened, ev.RunOpened)
        assert opened.slots == tuple(f"local slot {slot}" for slot in (1, 2, 3, 4))
        started = [(e.iteration, e.slot, e.where, e.pid) for e in events
                   if isinstance(e, ev.TrainingStarted)]
        assert started == [(5, 1, "local slot 1", 4242), (6, 2, WORKER, 0)]
        assert lines_of(events, 5)[-1] == "step 300/2000 loss 5.0e-02"
        assert lines_of(events, 6)[-1] == "simulated frame 40/200"
        progress = {e.iteration: (e.step, e.total) for e in events
                    if isinstance(e, ev.TrainingProgress)}
        assert progress == {5: (300, 2000), 6: (40, 200)}
        waiting = [e.proposal_id for e in events
                   if isinstance(e, ev.ProposalReady) and e.awaiting_review]
        assert waiting == [review.proposal_id for review in WAITING]
        # both logs keep streaming, each to its own iteration
        paths = RunPaths(slot_run)
        with paths.training_log(6).open("a") as log:
            log.write("simulated frame 80/200\n")
        with paths.training_log(5).open("a") as log:
            log.write("step 400/2000 loss 4.0e-02\n")
        later = attached.poll()
        assert lines_of(later, 5) == ["step 400/2000 loss 4.0e-02"]
        assert lines_of(later, 6) == ["simulated frame 80/200"]
    finally:
        attached.close()


def test_a_run_journaled_before_slots_reads_as_slot_1_on_this_machine(slot_run):
    with Journal.open_for_engine(slot_run) as journal:  # an old engine's process identity
        journal.append(9, Step.STARTED, {"block": 1})
        journal.append(9, Step.RUN_STARTED, {"pid": 77, "pgid": 77, "start_time": 1.0,
                                             "cgroup": None})
    attached = AttachedRun(slot_run)
    try:
        started = [e for e in attached.poll() if isinstance(e, ev.TrainingStarted)]
    finally:
        attached.close()
    assert (started[-1].iteration, started[-1].slot, started[-1].where, started[-1].pid) == \
        (9, 1, "local slot 1", 77)


async def test_the_attached_app_shows_each_slots_log_and_both_waiting_reviews(slot_run):
    app = attached_app(slot_run, QUIET)
    async with app.run_test(size=(140, 40)) as pilot:
        await until(pilot, lambda: len(app.state.waiting_reviews) == 2, "both reviews")
        await until(pilot, lambda: app.live_log.lines[-1:] == ["step 300/2000 loss 5.0e-02"],
                    "slot 1's log")
        assert app.state.slot_count == 4 and "slots 4/4 busy" in app.status_text()
        await pilot.press("]")
        assert app.live_log.lines[-1] == "simulated frame 40/200"
        assert app.state.slot_runs[2].where == WORKER
        # the slots whose iteration waits for review say so (from the journaled starts)
        bar = app.query_one("#slot-bar", Static)
        await until(pilot, lambda: "3: it 7 waiting for review" in str(bar.render()),
                    "slot 3's review")
        assert "4: it 8 waiting for review" in str(bar.render())
        await pilot.press("2", "]", "a")
        assert app.sent == [ev.Approve(proposal_id=WAITING[1].proposal_id)]
    with Journal.open_for_client(slot_run) as journal:
        [command] = journal.take_commands()
    assert (command.kind, command.payload["proposal_id"]) == ("Approve", WAITING[1].proposal_id)
