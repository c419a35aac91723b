"""The headless printer: every event a human must act on becomes a readable line."""

import io
import os

from engine import events as ev
from engine.headless import HeadlessPrinter
from engine.proposal import Proposal, Strategy


def printed(*events: ev.Event) -> str:
    stream = io.StringIO()
    printer = HeadlessPrinter(stream, live=False)
    for event in events:
        printer(event)
    return stream.getvalue()


def test_a_waiting_proposal_says_how_to_decide():
    proposal = Proposal(parent_id=3, strategy=Strategy.CODE_CHANGE, mutation="[code] clip")
    text = printed(ev.RunOpened("r7", "/tmp/r7", 10),
                   ev.ProposalReady(4, proposal, "--- a/x\n+++ b/x\n", "", True))
    assert "parent=3 strategy=code-modification mutation=[code] clip" in text
    assert "+++ b/x" in text
    assert "proctor approve r7" in text and "proctor reject r7 --reason" in text


def test_human_facing_events_are_printed():
    text = printed(
        ev.ManualEditDetected("models/trainer.py", "-a\n+b\n", "checkout"),
        ev.ProposalStale(5, "models/trainer.py"),
        ev.PolicyViolation(5, "'../x' is not an editable file"),
        ev.Paused("spend limit reached"),
        ev.NodeFinished(5, 5, "failed", {}, "exit code 1: boom", 0.8),
        ev.AgentCost(5, 0.0123, 1.5),
    )
    assert "manual edit of models/trainer.py in the checkout" in text
    assert "iteration 5 is stale" in text
    assert "policy violation in iteration 5" in text
    assert "paused: spend limit reached" in text
    assert "node 5: failed, exit code 1: boom; best R2 so far 0.8000" in text
    assert "agent cost $0.0123 (run total $1.50)" in text


def test_missing_sandbox_layers_are_named_in_the_run_header_and_the_apps_state():
    from tui.state import RunState

    missing = ("pid namespace: no namespaces (Operation not permitted); Landlock alone",)
    text = printed(ev.RunOpened("r7", "/tmp/r7", 10, sandbox_missing=missing))
    assert text.splitlines()[1] == f"  WARNING: sandbox layer missing: {missing[0]}"
    assert "WARNING" not in printed(ev.RunOpened("r7", "/tmp/r7", 10))
    state = RunState()
    notices = state.apply(ev.RunOpened("r7", "/tmp/r7", 10, sandbox_missing=missing))
    assert state.sandbox_missing == missing
    assert [n.severity for n in notices] == ["warning"] and missing[0] in notices[0].message


def test_terminal_codes_from_a_run_are_printed_as_plain_text():
    stream = io.StringIO()
    printer = HeadlessPrinter(stream, live=False, echo_log=True)
    printer(ev.LogLines(1, ("\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[2Jfinal_r2 0.99\x1b[8m",)))
    printer(ev.NodeFinished(1, 1, "failed", {}, "exit code 1: \x1b[2Jboom", None))
    assert "\x1b" not in stream.getvalue() and "\x07" not in stream.getvalue()
    assert "final_r2 0.99" in stream.getvalue() and "boom" in stream.getvalue()


def test_a_reader_that_goes_away_ends_the_printing_not_the_engine():
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    printer = HeadlessPrinter(stream, live=True)
    printer(ev.RunOpened("r7", "/tmp/r7", 10))
    os.close(read_end)  # `| head -1` has its line
    for iteration in (1, 2):  # neither the line nor the live status line may raise
        printer(ev.IterationStarted(iteration, 1, 10))
        printer(ev.NodeFinished(iteration, iteration, "done", {"final_r2": 0.5}, None, 0.5))
    stream.write("still writable: the descriptor now points at /dev/null\n")
    stream.close()


def test_with_several_slots_each_line_names_its_iteration_and_its_slot():
    config = Proposal(parent_id=None, strategy=Strategy.EXPLOIT, mutation="lr 1e-3")
    code = Proposal(parent_id=1, strategy=Strategy.CODE_CHANGE, mutation="[code] clip")
    stream = io.StringIO()
    printer = HeadlessPrinter(stream, live=False, echo_log=True)
    for event in (
        ev.RunOpened("r7", "/tmp/r7", 10, slots=("local slot 1", "local slot 2 on GPU 1")),
        ev.IterationStarted(7, 1, 10, 1),
        ev.IterationStarted(8, 1, 10, 2),
        ev.ProposalReady(7, config, "", "training.lr: 1e-2 -> 1e-3", False, "7.0-aa"),
        ev.TrainingStarted(7, 7, None, "lr 1e-3", 4242, 1, "local slot 1"),
        ev.ProposalReady(8, code, "+b\n", "", True, "8.0-bb"),
        ev.LogLines(7, ("step 1/3 loss 1.0",)),
        ev.NodeFinished(7, 7, "done", {"final_r2": 0.5}, None, 0.5),
    ):
        printer(event)
    assert stream.getvalue().splitlines() == [
        "run r7: 10 iterations, files in /tmp/r7",
        "  2 slots: local slot 1, local slot 2 on GPU 1",
        "[slot 1] iteration 7/10 (block 1)",
        "[slot 2] iteration 8/10 (block 1)",
        "[slot 1] iteration 7: proposal: parent=root strategy=exploit mutation=lr 1e-3",
        "[slot 1] iteration 7: training node 7 on local slot 1 (pid 4242)",
        "[slot 2] iteration 8: proposal: parent=1 strategy=code-modification "
        "mutation=[code] clip",
        "[slot 2] +b",
        "[slot 2]   waiting for review: proctor approve r7 --proposal 8.0-bb  |  "
        "proctor reject r7 --proposal 8.0-bb --reason TEXT",
        "[slot 1] | step 1/3 loss 1.0",
        "[slot 1] iteration 7: node 7: done, R2=0.5000; best R2 so far 0.5000",
    ]


def test_a_run_on_a_dask_worker_says_where_instead_of_a_pid():
    text = printed(ev.RunOpened("r7", "/tmp/r7", 10, slots=("dask slot 1 (tcp://h:8786)",)),
                   ev.TrainingStarted(3, 3, 1, "lr", 0, 1, "dask worker tcp://10.1.2.3:40211"))
    assert text.splitlines()[-1] == "  training node 3 on dask worker tcp://10.1.2.3:40211"
