"""Shared bits of the fake harnesses; copied into each test workspace as `models/fakekit.py`."""

import json
import os
import sys
from pathlib import Path

RESULTS_FD = 3  # the results channel: open only in a trusted run


def args() -> dict:
    """The case's config (JSON), from --config."""
    argv = sys.argv[1:]
    return json.loads(Path(argv[argv.index("--config") + 1]).read_text())


def has_channel() -> bool:
    """Whether this run holds a results channel (a trusted run)."""
    try:
        os.fstat(RESULTS_FD)
    except OSError:
        return False
    return True


def write_results(status: str, metrics: dict | None = None, **extra) -> bool:
    """Report on the results channel; False when the run has none (an untrusted run)."""
    if not has_channel():
        return False
    data = json.dumps({"status": status, "metrics": metrics or {}, **extra}).encode()
    with os.fdopen(RESULTS_FD, "wb") as channel:
        channel.write(data)
    return True


def note_pid(pid: int | None = None) -> None:
    """Record a process of this run (pid as seen inside the run, and /proc start time) in
    ./pids.txt."""
    pid = os.getpid() if pid is None else pid
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    start = int(stat[stat.rindex(b")") + 2 :].split()[19])
    with open("pids.txt", "a") as handle:
        handle.write(f"{pid} {start}\n")
