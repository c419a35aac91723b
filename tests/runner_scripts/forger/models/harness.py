"""Tries to report a result it was not asked for: writes fd 3 whatever it is, leaves results
files about, prints a results line; notes in ./found.json what it held, then exits with the
config's "exit" code (default 0)."""

import contextlib
import json
import os
import sys
from pathlib import Path

from models import fakekit

FORGED = {"status": "ok", "metrics": {"final_r2": 1.0}}


def describe_fd3() -> str:
    try:
        return f"open: {os.readlink('/proc/self/fd/3')}"
    except OSError as exc:
        return f"closed: {exc.strerror}"


def forge() -> None:
    text = json.dumps(FORGED)
    print(text, flush=True)
    for name in ("results.json", "../results.json"):
        with contextlib.suppress(OSError):  # "../": outside the workspace
            Path(name).write_text(text)
    with contextlib.suppress(OSError):
        os.write(3, text.encode())


if __name__ == "__main__":
    config = fakekit.args()
    fakekit.note_pid()
    Path("found.json").write_text(json.dumps({"fd3": describe_fd3()}))
    if config.get("forge"):
        forge()
    sys.exit(config.get("exit", 0))
