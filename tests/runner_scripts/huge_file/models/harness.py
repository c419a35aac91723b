"""Writes a file far larger than any sane limit."""

from models import fakekit

if __name__ == "__main__":
    fakekit.args()
    fakekit.note_pid()
    block = b"\0" * 2**20
    with open("huge.bin", "wb") as handle:
        for _ in range(64):
            handle.write(block)
            handle.flush()
