"""Leaves processes behind: a plain child, and a daemon that setsid()s and double-forks.
Then either finishes normally or hangs (config "hang")."""

import os
import subprocess
import time
from pathlib import Path

from models import fakekit


def detached_daemon() -> None:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            fakekit.note_pid()
            time.sleep(60)
        os._exit(0)


if __name__ == "__main__":
    config = fakekit.args()
    fakekit.note_pid()
    child = subprocess.Popen(["sleep", "60"])
    fakekit.note_pid(child.pid)
    detached_daemon()
    deadline = time.monotonic() + 5
    noted = Path("pids.txt")
    while noted.read_text().count("\n") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the daemon has noted itself
    print("children started", flush=True)
    if config.get("hang"):
        while True:
            time.sleep(0.05)
    fakekit.write_results("ok", {"final_r2": 0.5})
