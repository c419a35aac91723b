"""The command line as a user meets it: clear one-line errors with exit code 2, no
tracebacks, nothing started on bad input, and a light start-up."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.journal import Journal, RunEvent

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(HERE / "fakeproject", root, ignore=shutil.ignore_patterns("__pycache__", "log"))
    return root


def proctor(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)


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


def test_unknown_run_and_bad_numbers_are_usage_errors(project):
    missing = proctor("status", "nope", cwd=project)
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr
    zero = proctor("run", str(project / "configs" / "fake.yaml"), "--iterations", "0",
                   cwd=project)
    assert zero.returncode == 2 and "must be at least 1" in zero.stderr


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
