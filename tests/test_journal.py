"""The journal: resume queries, idempotent steps, commands between processes, the engine lock,
and what a SIGKILL leaves behind."""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import unprivileged

from engine.journal import (
    Journal,
    JournalError,
    RunEvent,
    RunLockedError,
    Step,
)
from engine.paths import JOURNAL_FILE
from engine.proposal import Proposal, Strategy
from engine.tree import Node

ROOT = Path(__file__).resolve().parents[1]


def python(code: str, *args: str) -> subprocess.Popen:
    """A fresh interpreter running `code` from the repo root, line-buffered pipes."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.iterdir())}


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "log" / "run-a"


def test_steps_and_resume_queries(run_dir):
    with Journal.open_for_engine(run_dir) as journal:
        assert journal.next_iteration() == 1 and journal.unfinished_iteration() is None
        proposal = Proposal(parent_id=None, strategy=Strategy.BASELINE, mutation="baseline")
        for step in Step:
            journal.append(1, step, proposal if step is Step.PROPOSAL_STORED else {"s": step})
        journal.append(2, Step.STARTED)
        journal.append(2, Step.PROPOSAL_STORED, {"parent_id": 1})
        journal.append(2, Step.REVIEW, {"proposal_id": "2.0-abc", "awaiting": False})
        journal.append(2, Step.DECISION, {"approved": True, "reason": "", "who": "auto"})
        journal.append(2, Step.APPLIED, Node(2, 1, {"lr": 1e-4}, metrics={"final_r2": 0.5}))
        journal.append(2, Step.RUN_STARTED, {"pid": 10, "pgid": 10, "start_time": 1.5})

        assert journal.last_step(1).step == Step.RECORDED
        assert journal.last_step(2).step == Step.RUN_STARTED
        assert journal.last_step(3) is None
        assert journal.unfinished_iteration() == 2
        assert journal.completed_iterations() == [1]
        assert journal.next_iteration() == 3
        stored = journal.payload(1, Step.PROPOSAL_STORED)
        assert Proposal.model_validate(stored) == proposal
        assert Node.from_dict(journal.payload(2, Step.APPLIED)).metrics == {"final_r2": 0.5}
        assert journal.payload(2, Step.RECORDED) is None
        assert [e.step for e in journal.events(2)] == list(Step)[:6]

        # A repair attempt replays later steps under attempt 1; payload() reads the latest.
        journal.append(2, Step.RUN_FINISHED, {"status": "crash"})
        journal.append(2, Step.PROPOSAL_STORED, {"parent_id": 1, "fix": True}, attempt=1)
        journal.append(2, Step.RUN_FINISHED, {"status": "ok"}, attempt=1)
        assert journal.payload(2, Step.RUN_FINISHED) == {"status": "ok"}
        assert journal.payload(2, Step.RUN_FINISHED, attempt=0) == {"status": "crash"}
        assert journal.last_step(2).attempt == 1

    # A client sees the same history without taking the lock.
    with Journal.open_for_client(run_dir) as client:
        assert client.unfinished_iterations() == [2]
        tail = client.events(after_seq=client.events()[-2].seq)
        assert [(e.iteration, e.step) for e in tail] == [(2, "run_finished")]


def test_reappending_a_step_returns_the_stored_one(run_dir):
    with Journal.open_for_engine(run_dir) as journal:
        journal.append(1, Step.STARTED)
        first = journal.append(1, Step.PROPOSAL_STORED, {"answer": 1})
        again = journal.append(1, Step.PROPOSAL_STORED, {"answer": 2})
        assert again == first and again.payload == {"answer": 1}
        journal.append(1, Step.RUN_STARTED, {"pid": 1})
        with pytest.raises(JournalError, match="already at 'run_started'"):
            journal.append(1, Step.DECISION, {"approved": True})
        with pytest.raises(JournalError, match="unknown iteration step"):
            journal.append(1, "finished")
        with pytest.raises(JournalError, match="not JSON-able"):
            journal.append(1, Step.RUN_FINISHED, {"path": Path("x")})
        count = len(journal.events())
    with Journal.open_for_engine(run_dir) as journal:
        assert journal.append(1, Step.PROPOSAL_STORED, {"answer": 3}).payload == {"answer": 1}
        assert len(journal.events()) == count


def test_run_events_and_agent_exchanges(run_dir):
    with Journal.open_for_engine(run_dir) as journal:
        created = journal.append_run_event(RunEvent.RUN_CREATED, {"config": {"iterations": 3}})
        assert journal.append_run_event(RunEvent.RUN_CREATED, {"config": {}}) == created
        journal.append_run_event(RunEvent.PAUSED, {"reason": "human"})
        journal.append_run_event(RunEvent.RESUMED)
        journal.append_run_event(RunEvent.PAUSED, {"reason": "budget"})
        paused = journal.run_events(RunEvent.PAUSED)
        assert [e.payload["reason"] for e in paused] == ["human", "budget"]
        assert [e.step for e in journal.run_events()] == [
            "run_created",
            "paused",
            "resumed",
            "paused",
        ]

        assert journal.exchange("iter-1/propose") is None
        answer = {"request": {"messages": []}, "response": {"content": "text", "cost": 0.01}}
        journal.store_exchange("iter-1/propose", answer, iteration=1)
        journal.store_exchange("iter-1/propose", {"response": "paid twice"}, iteration=1)
        assert journal.exchange("iter-1/propose") == answer
        journal.append(1, Step.STARTED)  # an exchange is not an iteration step
        assert journal.last_step(1).step == Step.STARTED


def test_commands_between_processes(run_dir):
    with Journal.open_for_engine(run_dir) as engine:
        assert engine.take_commands() == []
        poster = python(
            "import sys; from engine.journal import Journal\n"
            "with Journal.open_for_client(sys.argv[1]) as j:\n"
            "    print(j.post_command('approve', {'iteration': 4, 'who': 'cli'}))\n"
            "    print(j.post_command('stop', {'reason': 'enough'}))\n",
            str(run_dir),
        )
        out, err = poster.communicate(timeout=60)
        assert poster.returncode == 0, err
        ids = [int(line) for line in out.split()]

        # And a second Journal object in this process (an attached TUI's connection).
        with Journal.open_for_client(run_dir) as tui:
            ids.append(tui.post_command("reject", {"iteration": 4, "reason": "too big"}))
            taken = engine.take_commands()
            assert [c.id for c in taken] == ids
            assert [c.kind for c in taken] == ["approve", "stop", "reject"]
            assert taken[2].payload == {"iteration": 4, "reason": "too big"}
            assert all(tui.command_consumed(i) for i in ids)
            assert engine.take_commands() == []


def test_state_flags_survive_a_reopen(run_dir):
    with Journal.open_for_engine(run_dir) as journal:
        journal.set_state("paused", {"reason": "waiting for review"})
        journal.set_state("budget_usd", 1.5)
    with Journal.open_for_engine(run_dir) as journal:
        assert journal.state("paused") == {"reason": "waiting for review"}
        assert journal.state("budget_usd") == 1.5
        journal.set_state("paused", None)
        assert journal.state("paused", default=False) is False


def test_second_engine_is_refused_and_touches_nothing(run_dir):
    with Journal.open_for_engine(run_dir) as first:
        first.append(1, Step.STARTED, {"x": 1})
        first.set_state("paused", True)
        before = snapshot(run_dir)
        with pytest.raises(RunLockedError) as refused:
            Journal.open_for_engine(run_dir)
        assert snapshot(run_dir) == before
        message = str(refused.value)
        assert "run 'run-a'" in message and f"pid {os.getpid()}" in message
        assert first.last_step(1).step == Step.STARTED  # the holder is unaffected
    # Closing releases the lock.
    Journal.open_for_engine(run_dir).close()


def test_lock_is_released_when_the_holder_is_sigkilled(run_dir):
    holder = python(
        "import sys; from engine.journal import Journal, Step\n"
        "j = Journal.open_for_engine(sys.argv[1])\n"
        "j.append(1, Step.STARTED, {'by': 'holder'})\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n",
        str(run_dir),
    )
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
            Journal.open_for_engine(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    with Journal.open_for_engine(run_dir) as journal:
        assert journal.payload(1, Step.STARTED) == {"by": "holder"}
        assert journal.unfinished_iteration() == 1


BURST = """
import sys
from engine.journal import Journal, Step
journal = Journal.open_for_engine(sys.argv[1])
n = 0
for iteration in range(1, 100_000):
    for step in Step:
        journal.append(iteration, step, {"n": n, "pad": "x" * (n % 300)})
        print(n, flush=True)
        n += 1
"""


def test_sigkill_mid_burst_leaves_a_prefix(run_dir):
    kill_after = random.Random().randint(20, 200)
    writer = python(BURST, str(run_dir))
    try:
        for line in writer.stdout:
            if int(line) >= kill_after:
                break
        else:
            pytest.fail(f"writer stopped early: {writer.stderr.read()}")
    finally:
        writer.send_signal(signal.SIGKILL)  # it keeps appending while we get here
        writer.wait(timeout=30)

    with sqlite3.connect(run_dir / JOURNAL_FILE) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with Journal.open_for_engine(run_dir) as journal:
        events = journal.events()
    steps = list(Step)
    assert len(events) > kill_after
    for n, event in enumerate(events):
        assert event.seq == n + 1
        assert (event.iteration, event.step) == (1 + n // len(steps), steps[n % len(steps)])
        assert event.payload == {"n": n, "pad": "x" * (n % 300)}


def test_client_errors_are_one_clear_message(tmp_path):
    with pytest.raises(JournalError, match="no journal at .*is 'nope' a proctor run"):
        Journal.open_for_client(tmp_path / "nope")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / JOURNAL_FILE).write_bytes(b"not a database at all" * 100)
    with pytest.raises(JournalError, match="cannot be used"):
        Journal.open_for_client(garbage)
    future = tmp_path / "future"
    Journal.open_for_engine(future).close()
    with sqlite3.connect(future / JOURNAL_FILE) as raw:
        raw.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(JournalError, match="schema version 99, newer"):
        Journal.open_for_engine(future)


def test_a_viewer_judges_a_live_engine_by_its_lock_not_by_a_pid(run_dir):
    """The lock file names a pid that is alive (this test's own) but holds no lock: no
    engine drives the run, whatever process now has that pid."""
    from engine.attach import _flock_held

    lock = run_dir / "engine.lock"
    with Journal.open_for_engine(run_dir):
        assert _flock_held(lock) is True
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert _flock_held(lock) is False


READER = ("import sys\nfrom engine.journal import Journal, JournalError\n"
          "journal = Journal.open_for_client(sys.argv[1])\n"
          "print(' '.join(e.step for e in journal.events()))\n"
          "try:\n    journal.post_command('Stop', {})\nexcept JournalError as exc:\n"
          "    print(exc)\n")


@pytest.mark.parametrize("engine_alive", [True, False])
def test_a_user_who_may_only_read_a_run_can_still_watch_it(reachable_tmp, engine_alive):
    """A teammate with read access (not write) reads the journal, live or stopped, and is
    told plainly why a command cannot be sent."""
    if os.geteuid() != 0 or unprivileged.available() is not None:
        pytest.skip("needs root, to read root's run as another user")
    run_dir = reachable_tmp / "run"
    journal = Journal.open_for_engine(run_dir)
    journal.append_run_event(RunEvent.RUN_CREATED, {"settings": {}})
    journal.append(1, Step.STARTED, {"block": 1})
    if not engine_alive:
        journal.close()
    try:
        env = unprivileged.environment_for_nobody(
            {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent)},
            reachable_tmp / "hold")
        done = subprocess.run(
            unprivileged.argv_as_nobody([sys.executable, "-c", READER, str(run_dir)]),
            env=env, capture_output=True, text=True, timeout=60)
    finally:
        if engine_alive:
            journal.close()
    lines = done.stdout.splitlines()
    assert lines[:1] == ["run_created started"], done.stdout + done.stderr
    assert "cannot send Stop to the run: you may read" in done.stdout
