"""The app with several slots (`exploration.parallel`), fed the events an engine with slots
publishes: interleaved runs, one live log per slot, and several reviews waiting at once.

No engine runs here: the events are published by hand (tests/feed_source.py), as the engine
and an attached run publish them, so each test is quick and its state exact."""

from __future__ import annotations

from feed_source import FeedSource
from textual.command import CommandList
from textual.widgets import Label, Static
from waiting import until

from engine import events as ev
from engine.proposal import CodeEdit, Proposal, Strategy
from tui.app import ProctorApp
from tui.pump import EventPump
from tui.settings import TuiSettings

QUIET = TuiSettings(watch_files=False, show_clock=False, bell=False, toasts=False)
SLOTS = ("local slot 1", "local slot 2 on GPU 1", "local slot 3 on GPU 2")
HEADING = "── iteration {0}: training node {0} ──"


def config_change(mutation: str, strategy: Strategy = Strategy.EXPLOIT) -> Proposal:
    return Proposal(parent_id=None, strategy=strategy, mutation=mutation,
                    hypothesis=f"{mutation} helps")


def code_change(mutation: str) -> Proposal:
    return Proposal(parent_id=1, strategy=Strategy.CODE_CHANGE, mutation=mutation,
                    edits=(CodeEdit(file="models/siren.py", search="BONUS = 0.0",
                                    replace="BONUS = 0.01"),))


def start_training(iteration: int, slot: int, mutation: str,
                   strategy: Strategy = Strategy.EXPLOIT) -> list[ev.Event]:
    """What the engine publishes from an iteration's start to its training in `slot`."""
    return [ev.IterationStarted(iteration, 1, 10),
            ev.ProposalReady(iteration, config_change(mutation, strategy), "",
                             f"training.lr: {mutation}", False, f"{iteration}.0-x"),
            ev.ProposalDecided(iteration, True, proposal_id=f"{iteration}.0-x"),
            ev.TrainingStarted(iteration, iteration, None, mutation, 100 + iteration, slot,
                               SLOTS[slot - 1])]


def text_of(app: ProctorApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


async def opened(pilot, source: FeedSource, slots: tuple[str, ...]) -> None:
    await until(pilot, lambda: source.publish is not None, "the source")
    source.publish(ev.RunOpened("r1", "", 10, slots=slots))


async def test_each_slot_has_its_own_live_log_node_and_progress_and_the_keys_switch_them():
    source = FeedSource()
    app = ProctorApp(source, QUIET)
    async with app.run_test(size=(140, 40)) as pilot:
        await opened(pilot, source, SLOTS[:2])
        for event in [*start_training(1, 1, "lr 1e-3"),
                      *start_training(2, 2, "lr 3e-4", Strategy.EXPLORE),
                      ev.LogLines(1, ("one-a",)), ev.LogLines(2, ("two-a",)),
                      ev.LogLines(1, ("one-b",)), ev.TrainingProgress(2, 30, 100),
                      ev.TrainingProgress(1, 10, 100)]:
            source.publish(event)
        log = app.live_log
        await until(pilot, lambda: log.lines[-1:] == ["one-b"], "slot 1's lines")
        assert log.lines == [HEADING.format(1), "one-a", "one-b"]
        assert "slots 2/2 busy" in app.status_text()
        info = text_of(app, "#run-info")
        assert "slot 1/2 · local slot 1" in info and "lr 1e-3" in info
        assert "training 10/100 steps" in str(app.query_one("#progress-label", Label).content)
        bar = text_of(app, "#slot-bar")
        assert "1: it 1 training 10%" in bar and "2: it 2 training 30%" in bar
        await pilot.press("]")
        assert app.shown_slot == 2
        assert log.lines == [HEADING.format(2), "two-a"]
        info = text_of(app, "#run-info")
        assert "slot 2/2 · local slot 2 on GPU 1" in info and "strategy explore" in info
        assert "training 30/100 steps" in str(app.query_one("#progress-label", Label).content)
        # lines keep reaching both slots: the shown one's on screen, the other's kept
        source.publish(ev.LogLines(2, ("two-b",)))
        source.publish(ev.LogLines(1, ("one-c",)))
        await until(pilot, lambda: log.lines[-1:] == ["two-b"], "slot 2's new line")
        assert app.slot_logs.lines(1)[-1] == "one-c"
        await pilot.press("]")  # wraps around
        assert app.shown_slot == 1 and log.lines[-1] == "one-c"
        # a slot whose run finished says so; a repair re-run of the same node gets a heading
        source.publish(ev.NodeFinished(1, 1, "done", {"final_r2": 0.91}, None, 0.91))
        await until(pilot, lambda: "1: it 1 done" in text_of(app, "#slot-bar"), "the end")
        assert "slots 1/2 busy" in app.status_text()
        # the palette offers each slot by number, with where it runs
        await pilot.press("ctrl+p", *"show slot 2")
        await until(pilot, lambda: any(hits.option_count for hits in
                                       app.screen.query(CommandList)), "palette hits")
        await pilot.press("enter")
        await until(pilot, lambda: app.shown_slot == 2, "slot 2 from the palette")
        assert log.lines[-1] == "two-b"


async def test_reviews_of_two_slots_wait_while_the_third_trains_and_each_is_decided_apart():
    source = FeedSource()
    app = ProctorApp(source, QUIET)
    async with app.run_test(size=(140, 40)) as pilot:
        await opened(pilot, source, SLOTS)
        for event in [*start_training(1, 1, "lr 1e-3"), *start_training(2, 2, "lr 3e-4"),
                      *start_training(3, 3, "lr 1e-4"),
                      ev.NodeFinished(1, 1, "done", {"final_r2": 0.5}, None, 0.5),
                      ev.NodeFinished(3, 3, "done", {"final_r2": 0.6}, None, 0.6),
                      ev.IterationStarted(4, 1, 10), ev.IterationStarted(5, 1, 10),
                      ev.ProposalReady(4, code_change("[code] clip"), "+BONUS = 0.01", "",
                                       True, "4.0-aaaa"),
                      ev.ProposalReady(5, code_change("[code] huber"), "+huber", "", True,
                                       "5.0-bbbb")]:
            source.publish(event)
        await until(pilot, lambda: len(app.state.waiting_reviews) == 2, "two reviews")
        assert "slots 3/3 busy" in app.status_text()
        assert "2 waiting for review" in app.status_text()
        # the reviews hide nothing of slot 2's training
        source.publish(ev.LogLines(2, ("still training",)))
        source.publish(ev.TrainingProgress(2, 70, 100))
        await pilot.press("]")
        assert app.shown_slot == 2
        await until(pilot, lambda: app.live_log.lines[-1:] == ["still training"], "slot 2")
        assert "training 70/100 steps" in str(app.query_one("#progress-label", Label).content)
        assert "it 2 training 70%" in text_of(app, "#slot-bar")
        # the review tab lists both; ] picks the next; each decision names its own proposal
        await pilot.press("2")
        picker = text_of(app, "#review-picker")
        assert "2 proposals wait" in picker and "iteration 4" in picker and "iteration 5" in \
            picker
        assert app.current_review().proposal_id == "4.0-aaaa"
        assert app.review_view.diff_view.diff == "+BONUS = 0.01"
        await pilot.press("]")
        assert app.current_review().proposal_id == "5.0-bbbb"
        assert app.review_view.diff_view.diff == "+huber"
        await pilot.press("a")
        assert source.commands == [ev.Approve(proposal_id="5.0-bbbb")]
        # the one still undecided comes next, and a reason goes with its proposal only
        assert app.current_review().proposal_id == "4.0-aaaa"
        assert app.action_applies("reject")
        await pilot.press("r", *"too big", "enter")
        assert source.commands[-1] == ev.Reject(proposal_id="4.0-aaaa", reason="too big")
        assert not app.action_applies("accept")  # both decided: nothing left to send
        assert "(sent)" in text_of(app, "#review-picker")
        # the engine takes them; the run goes on
        source.publish(ev.ProposalDecided(5, True, by="human", proposal_id="5.0-bbbb"))
        source.publish(ev.ProposalDecided(4, False, "too big", "human", "4.0-aaaa"))
        await until(pilot, lambda: not app.state.waiting_reviews, "the decisions")
        assert "waiting for review" not in app.status_text()


async def test_one_slot_shows_no_slot_chrome():
    source = FeedSource()
    app = ProctorApp(source, QUIET)
    async with app.run_test(size=(140, 40)) as pilot:
        await opened(pilot, source, SLOTS[:1])
        for event in [*start_training(1, 1, "lr 1e-3"), ev.LogLines(1, ("only",))]:
            source.publish(event)
        await until(pilot, lambda: app.live_log.lines[-1:] == ["only"], "the line")
        assert not app.query_one("#slot-bar").has_class("shown")
        assert not app.query_one("#review-picker").has_class("shown")
        assert app.status_text() == "run r1 · iteration 1/10 · block 1 · training · attached"
        assert not app.action_applies("next_slot") and not app.action_applies("show_slot")
        await pilot.press("]")
        assert app.shown_slot == 1


def test_the_pump_keeps_the_latest_progress_of_every_slots_run():
    pump = EventPump()
    for step in range(5):
        pump.publish(ev.TrainingProgress(7, step, 10))
        pump.publish(ev.TrainingProgress(8, 2 * step, 10, "simulation"))
    assert pump.drain() == [ev.TrainingProgress(7, 4, 10),
                            ev.TrainingProgress(8, 8, 10, "simulation")]
