"""Prints forever, as fast as it can."""

from models import fakekit

if __name__ == "__main__":
    fakekit.args()
    fakekit.note_pid()
    line = "x" * 200
    step = 0
    while True:
        print(f"step {step} {line}")
        step += 1
