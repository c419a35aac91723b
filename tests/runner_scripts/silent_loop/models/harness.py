"""Loops forever without printing anything."""

import time

from models import fakekit

if __name__ == "__main__":
    fakekit.args()
    fakekit.note_pid()
    while True:
        time.sleep(0.05)
