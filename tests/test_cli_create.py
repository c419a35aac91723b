"""`proctor run` when the run cannot be created (FAULTS: run folder or log/ not writable,
disk full at run creation): one line, exit code 2, and nothing left behind, whichever way
the run starts (headless, in the TUI, --detach).

Permissions are tested as an unprivileged user (root ignores them: tests/unprivileged.py);
a full disk is a small full tmpfs over log/ in a private mount namespace (root only)."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest
import unprivileged

from engine.logs import strip_control

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODES = ["--headless", "--detach", "tui"]
LEAVE_SCREEN = "\x1b[?1049l"  # a terminal app leaves the alternate screen
RUN = ["run", "configs/fake.yaml", "--name", "w1", "--iterations", "1", "--agent", "heuristic"]


@pytest.fixture
def project(reachable_tmp: Path) -> Path:
    root = reachable_tmp / "project"
    shutil.copytree(HERE / "fakeproject", root, ignore=shutil.ignore_patterns("__pycache__", "log"))
    (root / "log").mkdir()
    (reachable_tmp / "home").mkdir()
    return root


def proctor_as_nobody(project: Path, mode: str, command: list[str] = RUN
                      ) -> subprocess.CompletedProcess:
    """`proctor run` (or `command`) as uid 65534 from `project`; "tui" runs it on a terminal
    (a pty)."""
    if unprivileged.available() is not None:
        pytest.skip(f"cannot run as an unprivileged user here: {unprivileged.available()}")
    unprivileged.give_to_nobody(project.parent)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(project.parent / "home"),
           "TERM": "xterm-256color"}
    env = unprivileged.environment_for_nobody(env, project.parent / "hold")
    argv = unprivileged.argv_as_nobody(
        [sys.executable, "-m", "tui.cli", *command, *([mode] if mode != "tui" else [])])
    if mode != "tui":
        return subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    return _on_a_terminal(argv, project, env)


def _on_a_terminal(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `argv` on a pty as its terminal; what it printed once the app left the screen
    comes back as stderr (the app draws on stderr, and the CLI complains there after it)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    screen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last holder of the terminal has gone
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave,
                                   stderr=slave, start_new_session=True)
        os.close(slave)
        process.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        os.close(master)
    text = screen.decode(errors="replace")
    assert LEAVE_SCREEN in text, text[-2000:]  # the app did start, then gave the screen back
    after = text.rsplit(LEAVE_SCREEN, 1)[1].replace("\r\n", "\n")
    return subprocess.CompletedProcess(argv, process.returncode, text, strip_control(after))


def one_line_exit_2(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proctor: cannot create run 'w1'"), lines
    for words in expected:
        assert words in lines[0]


@pytest.mark.parametrize("mode", MODES)
def test_a_log_folder_that_is_not_writable(project, mode):
    (project / "log").chmod(0o555)
    result = proctor_as_nobody(project, mode)
    one_line_exit_2(result, "Permission denied")
    assert list((project / "log").iterdir()) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_run_folder_that_is_not_writable(project, mode):
    run_dir = project / "log" / "w1"
    run_dir.mkdir(mode=0o555)
    result = proctor_as_nobody(project, mode)
    one_line_exit_2(result, "Permission denied")
    assert list((project / "log").iterdir()) == [run_dir]  # as it was: not proctor's to remove
    assert list(run_dir.iterdir()) == []


FULL_DISK = """
set -e
mount -t tmpfs -o size=256k proctor-full "$1/log"
cat /dev/zero > "$1/log/filler" 2>/dev/null || true
cd "$1"
shift
set +e
"$@"
echo "exit=$?"
ls -A log
"""


@pytest.mark.parametrize("mode", ["--headless", "--detach"])
def test_a_full_disk_at_run_creation(project, mode):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private mount namespace needs root and unshare")
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", FULL_DISK, "sh",
         str(project), sys.executable, "-m", "tui.cli", *RUN, mode],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL)
    *_, status, listing = result.stdout.strip().splitlines()
    assert (status, listing) == ("exit=2", "filler"), result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proctor: cannot create run 'w1'"), lines
    assert "no space left" in lines[0].lower()


def test_train_where_log_is_not_writable_is_one_line_and_exit_2(project):
    (project / "log").chmod(0o555)
    result = proctor_as_nobody(project, "--quiet", ["train", "configs/fake.yaml"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("proctor: cannot write the results of the run under ")
    assert list((project / "log").iterdir()) == []
