"""Spawns processes in a loop (bounded at `count`), each sleeping; then waits."""

import os
import time

from models import fakekit

if __name__ == "__main__":
    config = fakekit.args()
    fakekit.note_pid()
    for _ in range(config.get("count", 40)):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        fakekit.note_pid(pid)
    print("all forked", flush=True)
    time.sleep(60)
