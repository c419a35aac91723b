"""Shared bits of the fake harnesses; copied into each test workspace as `models/fakekit.py`."""

import json
import os
import sys
from pathlib import Path


def args() -> tuple[dict, Path]:
    """The case's config (JSON) and the results path, from --config/--results."""
    argv = sys.argv[1:]
    config = Path(argv[argv.index("--config") + 1])
    results = Path(argv[argv.index("--results") + 1])
    return json.loads(config.read_text()), results


def write_results(path: Path, status: str, metrics: dict | None = None, **extra) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"status": status, "metrics": metrics or {}, **extra}))
    os.replace(tmp, path)


def note_pid(pid: int | None = None) -> None:
    """Record a process of this run (pid and /proc start time) in ./pids.txt."""
    pid = os.getpid() if pid is None else pid
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    start = int(stat[stat.rindex(b")") + 2 :].split()[19])
    with open("pids.txt", "a") as handle:
        handle.write(f"{pid} {start}\n")
