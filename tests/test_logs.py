"""The run's log files: exact analysis entries, crash-safe appends (torn writes and a real
SIGKILL), memory.md edits, snapshots, node folders and the bounded tail reader."""

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.journal import Journal
from engine.logs import (
    LogsError,
    RunLogs,
    format_entry,
    format_number,
    log_tail,
    quality_word,
)
from engine.memory import MEMORY_MAX_LINES, MEMORY_TEMPLATE, memory_section
from engine.paths import numbered
from engine.proposal import CodeChange, CodeEdit, Proposal, Strategy
from engine.tree import Node, NodeStatus

ROOT = Path(__file__).resolve().parents[1]
KEYS = [
    "training.learning_rate",
    "training.frames_per_batch",
    "model.hidden_dim",
    "model.n_layers",
    "model.omega_0",
]


def config(learning_rate: float = 3e-5, hidden_dim: int = 128) -> dict:
    return {
        "dataset": {"field": "Jp", "n_frames": 24},
        "model": {"hidden_dim": hidden_dim, "n_layers": 3, "omega_0": 30.0},
        "training": {"steps": 1000, "learning_rate": learning_rate, "frames_per_batch": 4},
    }


def done(node_id: int, parent_id: int | None, r2: float, **metrics: float) -> Node:
    values = {"final_r2": r2, "final_mse": 4.1e-3, "slope": 0.902, "training_time_s": 36.0}
    return Node(
        id=node_id,
        parent_id=parent_id,
        config=config(),
        metrics=values | metrics,
        status=NodeStatus.DONE,
    )


EXPLOIT = Proposal(
    parent_id=11,
    strategy=Strategy.EXPLOIT,
    config_changes={"training.learning_rate": 3e-5},
    mutation="training.learning_rate: 1E-5 -> 3E-5",
    parent_rule="Node 11 (highest score)",
    hypothesis="A larger lr reaches the jumps.",
)
CODE = Proposal(
    parent_id=14,
    strategy=Strategy.CODE_CHANGE,
    edits=(CodeEdit(file="models/trainer.py", search="loss.backward()", replace="..."),),
    code_change=CodeChange(
        file="models/trainer.py",
        function="train",
        change="Clip the gradient norm to 1.0 between backward and the optimiser step",
    ),
    mutation="[code] gradient clipping max_norm=1.0",
    parent_rule="Node 14 (test code modification)",
    hypothesis="the loss spikes at omega_0=60 are gradient blow-ups",
)


# The lines CODE's entries share, from Mode/Strategy to the code block's Hypothesis.
CODE_LINES = textwrap.dedent("""\
    Mode/Strategy: code-modification
    Config: learning_rate=3E-5, frames_per_batch=4, hidden_dim=128, n_layers=3, omega_0=30.0
    CODE MODIFICATION:
      File: models/trainer.py
      Function: train
      Change: Clip the gradient norm to 1.0 between backward and the optimiser step
      Hypothesis: the loss spikes at omega_0=60 are gradient blow-ups
    """)


# -- analysis entries ---------------------------------------------------------------------


def test_config_entry_is_the_protocol_example():
    entry = format_entry(
        done(14, 11, 0.812),
        EXPLOIT,
        done(11, 5, 0.771),
        14,
        "Higher lr helps; still under-fitting jumps.",
        config_keys=KEYS,
    )
    assert entry == textwrap.dedent("""\
        ## Iter 14: moderate
        Node: id=14, parent=11
        Mode/Strategy: exploit
        Config: learning_rate=3E-5, frames_per_batch=4, hidden_dim=128, n_layers=3, omega_0=30.0
        Metrics: final_r2=0.812, final_mse=4.1E-03, slope=0.902, training_time=0.6min
        Field: field_name=Jp, n_frames=24
        Mutation: training.learning_rate: 1E-5 -> 3E-5
        Parent rule: Node 11 (highest score)
        Observation: R2 0.812 vs 0.771 (parent): +0.041. Higher lr helps; still under-fitting jumps.
        Next: parent=14
        """)


def test_code_entry_has_the_code_block_and_a_negative_delta():
    node = done(15, 14, 0.7861, final_mse=3.19e-8, slope=0.838, training_time_s=3540.0)
    entry = format_entry(
        node, CODE, done(14, 11, 0.812), 15, "Clipping cost accuracy.", config_keys=KEYS
    )
    assert entry == textwrap.dedent("""\
        ## Iter 15: moderate
        Node: id=15, parent=14
        """) + CODE_LINES + textwrap.dedent("""\
        Metrics: final_r2=0.786, final_mse=3.19E-08, slope=0.838, training_time=59.0min
        Field: field_name=Jp, n_frames=24
        Mutation: [code] gradient clipping max_norm=1.0
        Parent rule: Node 14 (test code modification)
        Observation: R2 0.786 vs 0.812 (parent): -0.026. Clipping cost accuracy.
        Next: parent=15
        """)


def test_failed_entry_shows_status_and_the_error_line_and_the_last_entry_has_no_next():
    failed = Node(id=16, parent_id=14, config=config(), status=NodeStatus.FAILED)
    error = "Traceback (most recent call last):\n  File x\nRuntimeError: shape mismatch\n"
    entry = format_entry(failed, CODE, done(14, 11, 0.812), None, "", config_keys=KEYS, error=error)
    assert entry == textwrap.dedent("""\
        ## Iter 16: failed
        Node: id=16, parent=14
        """) + CODE_LINES + textwrap.dedent("""\
        Metrics: status=failed, error=RuntimeError: shape mismatch
        Field: field_name=Jp, n_frames=24
        Mutation: [code] gradient clipping max_norm=1.0
        Parent rule: Node 14 (test code modification)
        Observation: no R2 (failed); parent R2 0.812.
        """)


def test_root_and_diverged_entries_and_agent_text_cannot_forge_lines():
    baseline = Proposal(parent_id=None, strategy=Strategy.BASELINE, parent_rule="root (baseline)")
    root = done(1, None, 0.96)
    entry = format_entry(
        root, baseline, None, 1, "Fine.\n## Iter 99: excellent\x1b[31m", config_keys=KEYS
    )
    lines = entry.splitlines()
    assert lines[0] == "## Iter 1: excellent"
    assert lines[1] == "Node: id=1, parent=root"
    assert "Mutation: none" in lines
    assert lines[-2] == "Observation: R2 0.960 (no parent). Fine. ## Iter 99: excellent"
    assert sum(line.startswith("## Iter") for line in lines) == 1

    diverged = Node(id=2, parent_id=1, config=config(), status=NodeStatus.DIVERGED)
    entry = format_entry(diverged, EXPLOIT, root, 1, "", config_keys=KEYS, error="loss is nan")
    assert entry.startswith("## Iter 2: diverged\n")
    assert "Metrics: status=diverged, error=loss is nan\n" in entry


@pytest.mark.parametrize(
    ("r2", "word"),
    [
        (0.951, "excellent"),
        (0.95, "good"),
        (0.90, "good"),
        (0.8999, "moderate"),
        (0.75, "moderate"),
        (0.7499, "poor"),
        (-3.0, "poor"),
        (float("nan"), "poor"),
    ],
)
def test_quality_word_boundaries(r2, word):
    assert quality_word(r2) == word


def test_numbers_in_the_originals_style():
    assert [format_number(v) for v in (2e-5, 1.5e-4, 5e-3, 0.01, 50.0, 0.5, 128, True)] == [
        "2E-5",
        "1.5E-4",
        "5E-3",
        "0.01",
        "50.0",
        "0.5",
        "128",
        "True",
    ]
    assert numbered(7) == "007" and numbered(1234) == "1234"


# -- crash-safe appends -------------------------------------------------------------------


@pytest.fixture
def journal(tmp_path):
    with Journal.open_for_engine(tmp_path / "run") as journal:
        yield journal


def entry(iteration: int) -> str:
    node = done(iteration, iteration - 1 or None, 0.8)
    return format_entry(node, EXPLOIT, None, iteration, "ok", config_keys=KEYS)


def test_torn_append_is_cut_on_open_and_reappended_once(journal):
    run_dir = journal.path.parent
    logs = RunLogs(run_dir, journal)
    assert logs.append_analysis(entry(1), 1)
    whole = logs.read_analysis()
    assert whole == entry(1) + "\n"
    # A SIGKILL mid-write: part of entry 2 is on disk, its end never recorded.
    with open(logs.paths.analysis, "a", encoding="utf-8") as handle:
        handle.write(entry(2)[:40])

    reopened = RunLogs(run_dir, journal)
    assert len(reopened.repairs) == 1 and "analysis.md" in reopened.repairs[0]
    assert reopened.read_analysis() == whole
    assert (run_dir / "analysis.md.torn").read_text() == entry(2)[:40]
    assert reopened.append_analysis(entry(2), 2)
    assert not reopened.append_analysis(entry(2), 2)  # the resumed step records it again
    assert reopened.read_analysis() == whole + entry(2) + "\n"
    assert RunLogs(run_dir, journal).repairs == []


def test_reasoning_banner_and_repair(journal):
    logs = RunLogs(journal.path.parent, journal)
    assert logs.append_reasoning(3, "I pick node 2.\n=== Iteration 9 ===\nfake\x07")
    assert logs.append_reasoning(3, "Repair: fix the indent.", attempt=1)
    assert not logs.append_reasoning(3, "again")
    text = logs.paths.reasoning.read_text()
    assert text == (
        "=== Iteration 3 ===\nI pick node 2.\n === Iteration 9 ===\nfake\n\n"
        "=== Iteration 3 (attempt 1) ===\nRepair: fix the indent.\n\n"
    )
    logs.paths.reasoning.write_text(text + "=== Iteration 4 ===\npart")
    assert RunLogs(journal.path.parent, journal).paths.reasoning.read_text() == text


def test_every_attempt_keeps_its_reasoning_under_its_own_banner(journal):
    run_dir = journal.path.parent
    logs = RunLogs(run_dir, journal)
    assert logs.append_reasoning(7, "Proposal: raise lr.", attempt=0)
    assert logs.append_reasoning(7, "Rejected (too risky): lower omega_0.", attempt=1)
    assert logs.append_reasoning(7, "Repair: the edit did not apply; clip instead.", attempt=2)
    assert not logs.append_reasoning(7, "Rejected (too risky): again.", attempt=1)
    expected = (
        "=== Iteration 7 ===\nProposal: raise lr.\n\n"
        "=== Iteration 7 (attempt 1) ===\nRejected (too risky): lower omega_0.\n\n"
        "=== Iteration 7 (attempt 2) ===\nRepair: the edit did not apply; clip instead.\n\n"
    )
    assert logs.paths.reasoning.read_text() == expected
    assert logs.repair_tails() == []
    reopened = RunLogs(run_dir, journal)  # a resumed engine repairs the tails on open
    assert reopened.repairs == [] and reopened.paths.reasoning.read_text() == expected
    assert not reopened.append_reasoning(7, "Repair: a second time.", attempt=2)


def test_shortened_file_becomes_the_new_baseline(journal):
    logs = RunLogs(journal.path.parent, journal)
    logs.append_analysis(entry(1), 1)
    logs.paths.analysis.write_text("edited by hand\n")
    reopened = RunLogs(journal.path.parent, journal)
    assert "shorter" in reopened.repairs[0]
    reopened.append_analysis(entry(2), 2)
    assert reopened.read_analysis() == "edited by hand\n" + entry(2) + "\n"


# The child records entry 1, writes entry 2 whole, and is SIGKILLed before recording its end.
KILLED_CHILD = """
import os, signal, sys
from engine.journal import Journal
from engine.logs import RunLogs

class DiesOnSecondRecord:
    def __init__(self, journal):
        self.journal, self.calls = journal, 0
    def state(self, key, default=None):
        return self.journal.state(key, default)
    def set_state(self, key, value):
        self.calls += 1
        if self.calls == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        self.journal.set_state(key, value)

journal = Journal.open_for_engine(sys.argv[1])
logs = RunLogs(sys.argv[1], DiesOnSecondRecord(journal))
logs.append_analysis(sys.argv[2], 1)
logs.append_analysis(sys.argv[3], 2)
"""


def test_sigkill_between_write_and_record_leaves_one_copy(tmp_path):
    run_dir = tmp_path / "run"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(run_dir), entry(1), entry(2)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert (run_dir / "analysis.md").read_text() == entry(1) + "\n" + entry(2) + "\n"
    with Journal.open_for_engine(run_dir) as journal:
        logs = RunLogs(run_dir, journal)
        assert logs.read_analysis() == entry(1) + "\n"
        assert not logs.append_analysis(entry(1), 1)
        assert logs.append_analysis(entry(2), 2)
        assert logs.read_analysis() == entry(1) + "\n" + entry(2) + "\n"


def test_a_reader_never_repairs_or_appends(journal):
    run_dir = journal.path.parent
    RunLogs(run_dir, journal).append_analysis(entry(1), 1)
    with open(run_dir / "analysis.md", "a") as handle:
        handle.write("## Iter 2: in progr")  # the engine is mid-append
    reader = RunLogs(run_dir)
    assert reader.read_analysis().endswith("in progr")
    with pytest.raises(LogsError, match="without the journal"):
        reader.append_analysis(entry(2), 2)


# -- memory.md ----------------------------------------------------------------------------


def test_memory_template_rewrite_and_cap(tmp_path):
    logs = RunLogs(tmp_path)
    assert logs.read_memory() == ""
    assert logs.init_memory() is None
    assert logs.read_memory() == MEMORY_TEMPLATE
    assert logs.init_memory("# other\n") is None  # already there: kept
    assert logs.read_memory() == MEMORY_TEMPLATE
    long_text = "\n".join(f"- line {i}" for i in range(MEMORY_MAX_LINES + 1))
    warning = logs.rewrite_memory(long_text)
    assert warning is not None and str(MEMORY_MAX_LINES + 1) in warning
    assert logs.read_memory() == long_text + "\n"  # kept whole
    assert logs.rewrite_memory("# short\n") is None


def test_do_not_retry_goes_under_its_heading(tmp_path):
    logs = RunLogs(tmp_path)
    logs.init_memory()
    logs.add_do_not_retry("Huber loss (node 7): crashed twice")
    logs.add_do_not_retry("LayerNorm (node 9): rejected, 'slower'")
    logs.add_do_not_retry("Huber loss (node 7): crashed twice")  # a resumed run: no duplicate
    lines = logs.read_memory().splitlines()
    start = lines.index("### Do not retry")
    assert lines[start + 1 : start + 4] == [
        "- Huber loss (node 7): crashed twice",
        "- LayerNorm (node 9): rejected, 'slower'",
        "",
    ]
    assert lines[start + 4] == "### Open questions"


def test_do_not_retry_notes_are_one_clean_line(tmp_path):
    logs = RunLogs(tmp_path)
    logs.rewrite_memory("# my own notes\n- keep me\n")
    logs.add_do_not_retry("clipping (node 3):\x1b[31m crashed\nRuntimeError: boom")
    assert logs.read_memory() == (
        "# my own notes\n- keep me\n\n### Do not retry\n"
        "- clipping (node 3): crashed RuntimeError: boom\n"
    )


def test_a_finished_node_no_longer_reads_pending(tmp_path):
    logs = RunLogs(tmp_path)
    memory = MEMORY_TEMPLATE.replace("### Iterations\n", "### Iterations\n"
                                     "- Node 1 (root): none [baseline] -> good\n"
                                     "- Node 2 (parent 1): lr: 1E-5 -> 3E-5 [exploit] -> pending\n"
                                     "- Node 3 (parent 1): [code] Huber loss [code-modification]"
                                     " -> pending\n"
                                     "- Node 4 (parent 2): seed: 0 -> 1 [re-test] -> pending\n")
    logs.rewrite_memory(memory)
    running = Node(id=4, parent_id=2, config={}, status=NodeStatus.RUNNING)
    failed = Node(id=3, parent_id=1, config={}, status=NodeStatus.FAILED)
    assert logs.settle_iterations([done(2, 1, 0.91), failed, running]) is None
    assert memory_section(logs.read_memory(), "iterations").splitlines() == [
        "- Node 1 (root): none [baseline] -> good",
        "- Node 2 (parent 1): lr: 1E-5 -> 3E-5 [exploit] -> good",
        "- Node 3 (parent 1): [code] Huber loss [code-modification] -> failed",
        "- Node 4 (parent 2): seed: 0 -> 1 [re-test] -> pending",
    ]
    settled = logs.read_memory()
    assert settled == memory.replace("3E-5 [exploit] -> pending", "3E-5 [exploit] -> good")\
        .replace("[code-modification] -> pending", "[code-modification] -> failed")
    logs.settle_iterations([done(2, 1, 0.91)])  # again: nothing left to change
    assert logs.read_memory() == settled


# -- snapshots and node folders -----------------------------------------------------------


def test_snapshots_are_written_once(tmp_path):
    logs = RunLogs(tmp_path)
    first = logs.snapshot_protocol(2, "protocol v1")
    assert first == tmp_path / "protocols" / "block_002.md"
    logs.snapshot_protocol(2, "protocol v2")
    assert first.read_text() == "protocol v1"
    logs.rewrite_memory("memory at the end of block 1")
    snapshot = logs.snapshot_memory(1)
    logs.rewrite_memory("later memory")
    assert logs.snapshot_memory(1) == snapshot == tmp_path / "memory" / "block_001.md"
    assert snapshot.read_text() == "memory at the end of block 1\n"


def test_config_snapshot_is_the_config_in_order(tmp_path):
    logs = RunLogs(tmp_path)
    path = logs.write_config_snapshot(1000, config(learning_rate=2e-5))
    assert path == tmp_path / "configs" / "iter_1000.yaml"
    assert yaml.safe_load(path.read_text()) == config(learning_rate=2e-5)
    assert path.read_text().startswith("dataset:")  # sort_keys=False
    with pytest.raises(LogsError, match="iteration 3"):
        logs.write_config_snapshot(3, {"bad": object()})


def test_node_folder_files(tmp_path):
    logs = RunLogs(tmp_path)
    node = Node(id=4, parent_id=None, config={}, metrics={"final_r2": float("nan")})
    node.status = NodeStatus.DIVERGED
    written = logs.write_metrics(node, "loss is nan", run={"exit_code": 3})
    assert written == tmp_path / "nodes" / "004" / "metrics.json"
    record = json.loads(written.read_text())
    assert record == {
        "node": 4,
        "status": "diverged",
        "metrics": {"final_r2": None},
        "error": "loss is nan",
        "run": {"exit_code": 3},
    }
    assert logs.read_metrics(4) == record and logs.read_metrics(5) == {}
    # The run's entry takes a failed node's error from its metrics.json.
    entry = logs.format_entry(node, EXPLOIT, None, None, "", KEYS)
    assert "Metrics: status=diverged, error=loss is nan\n" in entry
    written = logs.write_change(4, "--- a/models/trainer.py\n+++ b/models/trainer.py\n", "")
    assert written == [tmp_path / "nodes" / "004" / "change.diff"]
    config_diff = logs.write_change(5, "", "-lr: 1E-5\n+lr: 3E-5")
    assert config_diff == [tmp_path / "nodes" / "005" / "config.diff"]


def test_scores_file(tmp_path):
    logs = RunLogs(tmp_path)
    logs.write_scores("=== UCB Scores (Block 1, iters 1-12, N=0, c=1.414) ===\n\n")
    assert logs.paths.scores.read_text().startswith("=== UCB Scores")


# -- the tail reader ----------------------------------------------------------------------


def test_log_tail_of_a_huge_log_is_bounded_and_clean(tmp_path):
    path = tmp_path / "training.log"
    line = b"step 100 loss 0.5 \x1b[31mred\x1b[0m\r\n"  # 32 bytes
    before, after = 700_000, 700_000
    with open(path, "wb") as handle:
        handle.write(b"START\x07 of training\n")
        handle.write(line * before)
        handle.write(b"{" + b"x" * (10 * 1024 * 1024) + b"}\n")  # one 10 MB line
        handle.write(line * after)
        handle.write(b"RuntimeError: boom\n")
    assert path.stat().st_size > 50 * 1024 * 1024

    tail = log_tail(path, max_bytes=16_384, head_lines=5, tail_lines=20)
    assert len(tail.encode()) <= 16_384 + 200
    lines = tail.splitlines()
    assert lines[0] == "START of training"
    assert lines[1] == "step 100 loss 0.5 red"
    assert lines[5] == f"… [{before + 1 + after - 4 - 19} lines omitted] …"
    assert lines[-1] == "RuntimeError: boom"
    assert not any(ch in tail for ch in "\x1b\r\x07")


def test_log_tail_cuts_a_giant_last_line(tmp_path):
    path = tmp_path / "training.log"
    path.write_bytes(b"head\n" + b"y" * 5_000_000 + b"END")
    tail = log_tail(path, max_bytes=4096, head_lines=3, tail_lines=3)
    head, last = tail.splitlines()
    assert head == "head"
    assert last.startswith("[") and "bytes cut] …" in last and last.endswith("yEND")
    assert len(tail) <= 4096 + 100


def test_log_tail_small_files(tmp_path):
    path = tmp_path / "training.log"
    assert log_tail(path) == ""
    path.write_text("".join(f"line {i}\t\x00x\n" for i in range(10)))
    assert log_tail(path).splitlines() == [f"line {i}\tx" for i in range(10)]
    assert log_tail(path, head_lines=2, tail_lines=3).splitlines() == [
        "line 0\tx",
        "line 1\tx",
        "… [5 lines omitted] …",
        "line 7\tx",
        "line 8\tx",
        "line 9\tx",
    ]


def _shown_line_ids(output: str, lines: list[str]) -> list[int | None]:
    """Which original line each output line shows (None: an omitted one), checking that a cut
    line is a true prefix or suffix of its original."""
    shown: list[int | None] = []
    for text in output.splitlines():
        if omitted := re.fullmatch(r"… \[(\d+) lines omitted\] …", text):
            shown += [None] * int(omitted.group(1))
        elif suffix := re.fullmatch(r"\[(\d+) bytes cut\] …(.*)", text):
            cut, rest = int(suffix.group(1)), suffix.group(2)
            index = next(i for i, line in enumerate(lines) if line == lines[i][:cut] + rest)
            shown.append(index)
        elif prefix := re.fullmatch(r"(.*)… \[(\d+) bytes cut\]", text):
            index = int(prefix.group(1).split(":")[0])
            assert lines[index] == prefix.group(1) + lines[index][len(prefix.group(1)) :]
            assert len(lines[index]) == len(prefix.group(1)) + int(prefix.group(2))
            shown.append(index)
        else:
            index = int(text.split(":")[0])
            assert lines[index] == text
            shown.append(index)
    return shown


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lengths=st.lists(st.sampled_from([0, 3, 40, 300, 3000]), max_size=60),
    final_newline=st.booleans(),
    max_bytes=st.sampled_from([64, 256, 1024, 4096]),
    head_lines=st.integers(0, 5),
    tail_lines=st.integers(0, 8),
)
def test_log_tail_accounts_for_every_line(
    tmp_path, lengths, final_newline, max_bytes, head_lines, tail_lines
):
    lines = [f"{i}:" + "a" * length + f"z{i}" for i, length in enumerate(lengths)]
    data = "\n".join(lines) + ("\n" if final_newline and lines else "")
    path = tmp_path / "training.log"
    path.write_text(data)
    output = log_tail(path, max_bytes=max_bytes, head_lines=head_lines, tail_lines=tail_lines)
    assert len(output.encode()) <= max_bytes + 40 * (head_lines + tail_lines + 1)
    shown = _shown_line_ids(output, lines)
    # Every line appears once, in order, or is counted as omitted.
    assert len(shown) == len(lines)
    assert all(index is None or index == position for position, index in enumerate(shown))
