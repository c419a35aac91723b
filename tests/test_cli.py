"""The command line as a user meets it: clear one-line errors with exit code 2, no
tracebacks, nothing started on bad input, and a light start-up.

`approve/reject/status/resume` run against runs whose journal is written by hand, the way
the engine journals a review: what waits, what is refused (exit 2, nothing sent), what a
decision names, and what `status` shows; a process that holds the engine lock stands for a
live engine. A real engine drives the end-to-end test at the bottom."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from waiting import wait_for

from engine.journal import Journal, JournalError, RunEvent, Step
from engine.review import Review, proposal_id, waiting_review
from engine.state import RunState

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ESCAPES = "\x1b]0;x\x07\x1b[31m"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(HERE / "fakeproject", root, ignore=shutil.ignore_patterns("__pycache__", "log"))
    return root


def proctor(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("bad, expected", [
    ("exploration:\n  iterations: 3\n  ucb_k: 1\n", "exploration.ucb_k: unknown key"),
    ("exploration:\n  block_size: [1]\n", "exploration.block_size: Input should be a valid"),
    ("training: !!python/object/apply:os.system ['echo pwned']\n", "YAML tag"),
    ("training:\n  learning_rate: 1.0e-3\n  stepz: 3\n", "training.stepz: unknown key"),
    ("training: {learning_rate: 1.0e-3\n", "not valid YAML"),
])
@pytest.mark.parametrize("command", ["train", "run"])
def test_bad_config_is_one_message_exit_2_and_nothing_starts(project, bad, expected, command):
    config = project / "configs" / "bad.yaml"
    config.write_text(bad)
    result = proctor(command, str(config), cwd=project)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "pwned" not in result.stdout
    assert not (project / "log").exists()


def test_run_then_status_then_taken_name(project):
    config = str(project / "configs" / "fake.yaml")
    first = proctor("run", config, "--iterations", "2", "--name", "n1", "--agent", "heuristic",
                    cwd=project)
    assert first.returncode == 0, first.stderr
    assert "finished: completed 2 iterations" in first.stdout
    status = proctor("status", "n1", cwd=project)
    assert status.returncode == 0, status.stderr
    rows = [line for line in status.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row.split()[0] for row in rows] == ["1", "2"]
    again = proctor("run", config, "--name", "n1", cwd=project)
    assert again.returncode == 2
    assert "already exists" in again.stderr and "proctor resume n1" in again.stderr


def test_a_detached_engine_that_refuses_its_run_leaves_nothing(project):
    result = proctor("run", "configs/fake.yaml", "--detach", "--name", "bad/name",
                     cwd=project)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "proctor: run name 'bad/name' must be letters, digits, '_', '.', '-'"]
    assert not (project / "log").exists()


def test_unknown_run_and_bad_numbers_are_usage_errors(project):
    missing = proctor("status", "nope", cwd=project)
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr
    zero = proctor("run", str(project / "configs" / "fake.yaml"), "--iterations", "0",
                   cwd=project)
    assert zero.returncode == 2 and "must be at least 1" in zero.stderr
    centuries = proctor("run", str(project / "configs" / "fake.yaml"), "--iterations",
                        "100000000", cwd=project)
    assert centuries.returncode == 2 and "must be at most 100,000" in centuries.stderr
    assert not (project / "log").exists()


def test_a_headless_run_into_a_pipe_its_reader_closed_runs_to_the_end(project, tmp_path):
    # `proctor run ... --headless | head -1`: the printing ends, the run does not
    errors = tmp_path / "stderr"
    with open(errors, "w") as stderr:
        run = subprocess.Popen(
            [sys.executable, "-m", "tui.cli", "run", str(project / "configs" / "fake.yaml"),
             "--headless", "--iterations", "3", "--name", "p1", "--agent", "heuristic"],
            cwd=project, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        assert run.stdout.readline().startswith(b"run p1: 3 iterations")
        run.stdout.close()  # as `head -1` does once it has its line
        assert run.wait(timeout=120) == 0
    assert errors.read_text() == ""
    with Journal.open_for_client(project / "log" / "p1") as journal:
        assert journal.completed_iterations() == [1, 2, 3]
        assert journal.run_events(RunEvent.STOPPED)[-1].payload["reason"] == \
            "completed 3 iterations"


def test_start_up_does_not_import_torch_or_anthropic():
    probe = ("import sys, tui.cli\n"
             "try:\n    tui.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'anthropic', 'textual') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]"


CREATOR = """
import sys
from dataclasses import asdict
from pathlib import Path
from engine.config import load_config
from engine.journal import Journal, RunEvent
from engine.runs import RunSettings

project, name = Path(sys.argv[1]), sys.argv[2]
config_path = project / "configs" / "fake.yaml"
settings = RunSettings(name=name, config_path=str(config_path), iterations=4,
                       approval="code", agent="scripted", runner="subprocess")
with Journal.open_for_engine(project / "log" / name) as journal:
    journal.append_run_event(RunEvent.RUN_CREATED, {
        "settings": asdict(settings), "project_root": str(project),
        "config": load_config(config_path).model_dump(mode="json")})
"""


def create_run(project: Path, name: str = "r1") -> Path:
    """A run folder with its creation record, as an engine process writes it before it
    ends (its lock file names a process that is gone)."""
    subprocess.run([sys.executable, "-c", CREATOR, str(project), name], cwd=REPO, check=True,
                   timeout=60)
    return project / "log" / name


def journal_of(run_dir: Path) -> Journal:
    return Journal.open_for_client(run_dir)


HOLDER = ("import sys\nfrom engine.journal import Journal\n"
          "journal = Journal.open_for_engine(sys.argv[1])\nprint('held', flush=True)\n"
          "sys.stdin.read()\n")


@contextmanager
def engine_holds(run_dir: Path) -> Iterator[None]:
    """A process that holds the run's engine lock, as a live engine does; it exits after."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def review(iteration: int, attempt: int, mutation: str = "[code] clip the gradients",
           awaiting: bool = True) -> Review:
    content = {"mutation": mutation, "attempt": attempt}
    return Review(proposal_id=proposal_id(iteration, attempt, content), iteration=iteration,
                  attempt=attempt, mutation=mutation,
                  diff="--- a/models/trainer.py\n+++ b/models/trainer.py\n-a\n+b\n+c\n",
                  config_diff="", files=("models/trainer.py",), added=2, removed=1,
                  awaiting=awaiting, parent_id=1)


def put_review(journal: Journal, prepared: Review) -> None:
    journal.append(prepared.iteration, Step.STARTED, {"block": 1})
    journal.append(prepared.iteration, Step.REVIEW, prepared.to_dict(), attempt=prepared.attempt)


def posted(run_dir: Path) -> list[dict]:
    """The commands waiting in the run's journal (taken, as an engine would)."""
    with journal_of(run_dir) as journal:
        return [{"kind": c.kind, **c.payload} for c in journal.take_commands()]


@pytest.fixture
def stopped_run(project: Path) -> Path:
    """Run r1, no engine: iteration 2 waits for review (attempt 1; attempt 0 was refused)."""
    run_dir = create_run(project)
    with journal_of(run_dir) as journal:
        put_review(journal, review(2, 0, "[code] first try", awaiting=False))
        journal.append(2, Step.REVIEW, review(2, 1).to_dict(), attempt=1)
    return run_dir


def test_nothing_waiting_is_refused_with_what_the_run_does_and_nothing_is_sent(project):
    run_dir = create_run(project)
    with journal_of(run_dir) as journal:
        journal.append(1, Step.STARTED, {"block": 1})
        journal.append(1, Step.RUN_STARTED, {"pid": 1})
    with engine_holds(run_dir):
        result = proctor("approve", "r1", cwd=project)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            "proctor: run r1: nothing waits for review (driven by an engine; iteration 1 is "
            "training)"]
        rejected = proctor("reject", "r1", "--reason", "no", cwd=project)
        assert rejected.returncode == 2 and "nothing waits for review" in rejected.stderr
    crashed = proctor("approve", "r1", cwd=project)
    assert crashed.returncode == 2
    assert crashed.stderr.strip().splitlines() == [
        "proctor: run r1: nothing waits for review (no engine drives it (it crashed or was "
        "killed); iteration 1 is unfinished; `proctor resume r1` continues it)"]
    assert posted(run_dir) == []


def test_a_decision_for_an_attempt_the_human_did_not_see_is_refused(stopped_run):
    project = stopped_run.parents[1]
    seen = review(2, 0, "[code] first try", awaiting=False).proposal_id
    waiting = review(2, 1)
    for args in (("approve", "r1"), ("reject", "r1", "--reason", "no")):
        result = proctor(*args, "--proposal", seen, cwd=project)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"proctor: run r1: proposal {seen} does not wait for review; what waits now is "
            f"{waiting.summary()}"]
    assert posted(stopped_run) == []


def test_without_an_engine_the_decision_names_its_proposal_and_waits_for_a_resume(stopped_run):
    project = stopped_run.parents[1]
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    for key, value in (("user.name", "Ada Lovelace"), ("user.email", "ada@example.com")):
        subprocess.run(["git", "-C", str(project), "config", key, value], check=True)
    waiting = review(2, 1)
    result = proctor("approve", "r1", "--proposal", waiting.proposal_id, cwd=project)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"run r1: approving {waiting.summary()}"
    assert "models/trainer.py +2/-1" in lines[0] and "(iteration 2)" in lines[0]
    assert lines[1] == (f"no engine is driving run r1: the decision is kept for proposal "
                        f"{waiting.proposal_id} only and applies when the run is resumed "
                        "(proctor resume r1)")
    assert posted(stopped_run) == [{"kind": "Approve", "proposal_id": waiting.proposal_id,
                                    "by": "Ada Lovelace <ada@example.com>"}]
    # without --proposal it decides what waits, and says which one; no git identity: by ''
    shutil.rmtree(project / ".git")
    rejected = proctor("reject", "r1", "--reason", "too risky", cwd=project)
    assert rejected.returncode == 0, rejected.stderr
    assert posted(stopped_run) == [{"kind": "Reject", "proposal_id": waiting.proposal_id,
                                    "reason": "too risky", "by": ""}]


def _engine_that_decides(run_dir: Path, prepared: Review, stop: threading.Event) -> None:
    """What the engine does with a decision: take it, journal it for the attempt."""
    with journal_of(run_dir) as journal:
        while not stop.is_set():
            for command in journal.take_commands():
                journal.append(prepared.iteration, Step.DECISION,
                               {"approved": command.kind == "Approve",
                                "reason": command.payload.get("reason", ""), "by": "human"},
                               attempt=prepared.attempt)
                return
            stop.wait(0.02)


def test_a_live_engine_records_the_decision_and_the_command_says_so(project):
    prepared = review(3, 0)
    run_dir = create_run(project)
    with journal_of(run_dir) as journal:
        put_review(journal, prepared)
    stop = threading.Event()
    engine = threading.Thread(target=_engine_that_decides, args=(run_dir, prepared, stop))
    with engine_holds(run_dir):
        engine.start()
        try:
            result = proctor("reject", "r1", "--reason", "keep the baseline", cwd=project)
        finally:
            stop.set()
            engine.join()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == \
        "run r1: the engine recorded it: rejected by human: keep the baseline"


def test_terminal_escapes_in_a_reason_and_a_mutation_never_reach_the_terminal(project):
    run_dir = create_run(project)
    with journal_of(run_dir) as journal:
        put_review(journal, review(2, 0, f"[code] {ESCAPES}red mutation"))
    results = [proctor("status", "r1", cwd=project),
               proctor("reject", "r1", "--reason", f"bad {ESCAPES}colours", cwd=project),
               proctor("approve", "r1", "--proposal", f"x{ESCAPES}", cwd=project)]
    for result in results:
        out = result.stdout + result.stderr
        assert "\x1b" not in out and "\x07" not in out, out
    assert "[code] red mutation" in results[0].stdout
    assert "reason: bad colours" in results[1].stdout
    assert results[2].returncode == 2 and "proposal x does not wait" in results[2].stderr
    [command] = posted(run_dir)
    assert command["reason"] == f"bad {ESCAPES}colours"  # the agent gets the reason as typed


def test_status_shows_the_waiting_review_the_pause_and_who_drives_the_run(stopped_run):
    project = stopped_run.parents[1]
    waiting = review(2, 1)
    with journal_of(stopped_run) as journal:
        RunState(journal).paused = "disk full while recording iteration 2"
    with engine_holds(stopped_run):
        text = proctor("status", "r1", cwd=project)
        fields = json.loads(proctor("status", "r1", "--json", cwd=project).stdout)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == "run r1: 0 nodes; driven by an engine; iteration 2 waits for review"
    assert lines[1] == ("  PAUSED: disk full while recording iteration 2  "
                        "(continue it: proctor resume r1)")
    assert lines[2] == f"  waiting for review: {waiting.summary()}"
    assert lines[3] == f"    proctor approve r1 --proposal {waiting.proposal_id}"
    assert lines[4] == f"    proctor reject r1 --proposal {waiting.proposal_id} --reason TEXT"
    assert fields["engine"] == "running"
    assert fields["paused"] == "disk full while recording iteration 2"
    assert fields["resume"] == "proctor resume r1"
    assert fields["review"]["proposal_id"] == waiting.proposal_id
    assert fields["review"]["files"] == ["models/trainer.py"]
    assert fields["review"]["approve"] == f"proctor approve r1 --proposal {waiting.proposal_id}"
    assert fields["nodes"] == [] and fields["iteration"] == 2
    # the engine is gone without recording a stop: it crashed
    crashed = proctor("status", "r1", cwd=project)
    assert crashed.stdout.splitlines()[0] == (
        "run r1: 0 nodes; no engine drives it (it crashed or was killed); iteration 2 is "
        "unfinished; `proctor resume r1` continues it")
    assert json.loads(proctor("status", "r1", "--json", cwd=project).stdout)["engine"] == \
        "crashed"


def test_status_of_a_stopped_run(project):
    run_dir = create_run(project)
    with journal_of(run_dir) as journal:
        journal.append_run_event(RunEvent.STOPPED, {"reason": "stopped by a human"})
    result = proctor("status", "r1", cwd=project)
    assert result.stdout.splitlines()[0] == (
        "run r1: 0 nodes; stopped (stopped by a human); `proctor resume r1` continues it")
    fields = json.loads(proctor("status", "r1", "--json", cwd=project).stdout)
    assert (fields["engine"], fields["stopped"], fields["review"]) == \
        ("stopped", "stopped by a human", None)


@pytest.mark.parametrize("paused", [None, "spend limit reached"])
def test_resume_asks_a_live_engine_even_when_the_journal_shows_no_pause(project, paused):
    # a pause for a full disk is held in the engine's memory only: the journal shows none
    run_dir = create_run(project)
    with journal_of(run_dir) as journal:
        RunState(journal).paused = paused
    with engine_holds(run_dir):
        result = proctor("resume", "r1", cwd=project)
    assert result.returncode == 0, result.stderr
    assert [command["kind"] for command in posted(run_dir)] == ["ResumeRun"]
    if paused is None:
        assert "its journal shows no pause, so it resumes if it holds one the journal could " \
               "not record (a full disk), and otherwise nothing changes" in result.stdout
    else:
        assert "asked the engine driving run r1 to resume (paused: spend limit reached)" in \
            result.stdout
    assert "already driven" not in result.stdout + result.stderr


def test_status_into_a_closed_pipe_ends_quietly(project):
    create_run(project)
    for args in (("status", "r1"), ("--help",)):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first line
        try:
            done = subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=project,
                                  env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                                  stdout=write_end, stderr=subprocess.PIPE, text=True,
                                  timeout=120, stdin=subprocess.DEVNULL)
        finally:
            os.close(write_end)
        assert done.stderr == "", done.stderr
        assert done.returncode == 141


def test_status_with_stdout_closed_or_on_a_full_disk_is_never_a_traceback(project):
    """`proctor status r1 >&-` ends as if it printed; `>/dev/full` is one line and exit 1."""
    create_run(project)
    command = [sys.executable, "-m", "tui.cli", "status", "r1"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    closed = subprocess.run(command, cwd=project, env=env, stdout=None, stderr=subprocess.PIPE,
                            text=True, timeout=120, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: os.close(1))
    assert (closed.returncode, closed.stderr) == (0, "")
    with open("/dev/full", "w") as full:
        done = subprocess.run(command, cwd=project, env=env, stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert done.stderr == "proctor: cannot write the output: No space left on device\n"


def has_run_record(run_dir: Path) -> bool:
    try:
        with journal_of(run_dir) as journal:
            return bool(journal.run_events(RunEvent.RUN_CREATED))
    except JournalError:
        return False  # not there, or its schema not written yet


def test_a_real_engine_takes_the_decision_for_the_proposal_that_waits_and_no_other(project):
    run_dir = project / "log" / "r1"
    engine = subprocess.Popen(
        [sys.executable, str(HERE / "loop_driver.py"), str(project), "r1", "4", "code"],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: has_run_record(run_dir), "the run to be created")
        # a decision for a proposal that does not wait (a stale viewer's) is never held
        with journal_of(run_dir) as journal:
            stale = journal.post_command("Approve", {"proposal_id": "3.0-0000000000", "by": ""})
            wait_for(lambda: waiting_review(journal) is not None
                     and journal.command_consumed(stale), "iteration 3's review")
            waiting = waiting_review(journal)
            assert waiting.iteration == 3 and waiting.awaiting
            assert journal.payload(3, Step.DECISION, waiting.attempt) is None
        refused = proctor("approve", "r1", "--proposal", "3.0-0000000000", cwd=project)
        assert refused.returncode == 2
        assert f"what waits now is {waiting.summary()}" in refused.stderr
        status = proctor("status", "r1", cwd=project).stdout.splitlines()
        assert status[0] == "run r1: 2 nodes; driven by an engine; iteration 3 waits for review"
        assert status[1] == f"  waiting for review: {waiting.summary()}"
        approved = proctor("approve", "r1", cwd=project)
        assert approved.returncode == 0, approved.stderr
        assert approved.stdout.splitlines()[-1].startswith(
            "run r1: the engine recorded it: approved by ")
        assert engine.wait(timeout=120) == 0
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
    with journal_of(run_dir) as journal:
        assert journal.completed_iterations() == [1, 2, 3, 4]
        assert journal.payload(3, Step.DECISION, waiting.attempt)["approved"] is True
    assert "stopped (completed 4 iterations)" in proctor("status", "r1", cwd=project).stdout
