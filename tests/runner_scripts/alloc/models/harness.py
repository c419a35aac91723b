"""Allocates memory without bound."""

from models import fakekit

if __name__ == "__main__":
    fakekit.args()
    fakekit.note_pid()
    hoard = []
    while True:
        hoard.append(bytearray(32 * 2**20))
