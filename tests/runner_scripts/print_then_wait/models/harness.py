"""Prints one short line, then waits forever without printing."""

import time

from models import fakekit

if __name__ == "__main__":
    fakekit.args()
    fakekit.note_pid()
    print("first line of the run", flush=True)
    while True:
        time.sleep(0.05)
