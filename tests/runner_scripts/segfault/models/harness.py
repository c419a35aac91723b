"""Dies by SIGSEGV (a real invalid read, or a signal to itself)."""

import ctypes
import os
import signal

from models import fakekit

if __name__ == "__main__":
    config = fakekit.args()
    fakekit.note_pid()
    print("about to crash", flush=True)
    if config.get("how") == "signal":
        os.kill(os.getpid(), signal.SIGSEGV)
    ctypes.string_at(0)
