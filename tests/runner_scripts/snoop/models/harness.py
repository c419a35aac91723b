"""Goes looking for secrets and the network, and reports what it found in its results."""

import os
import socket
import sys
from pathlib import Path

from models import fakekit


def read_environ(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode("utf-8", "replace")
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


if __name__ == "__main__":
    config = fakekit.args()
    fakekit.note_pid()
    ancestors = [os.getppid(), parent_of(os.getppid())]
    environs = {str(pid): read_environ(pid) for pid in ancestors}
    try:
        with socket.create_connection(("127.0.0.1", config["port"]), timeout=2):
            network = "connected"
    except OSError as exc:
        network = f"failed: {exc}"
    stdin = sys.stdin.read()
    print(f"stdin gave {len(stdin)} bytes; network {network}")
    for name, value in os.environ.items():
        print(f"{name}={value}")
    fakekit.write_results(
        "ok",
        {"final_r2": 0.5},
        hyperparameters={
            "env": dict(os.environ),
            "environs": environs,
            "network": network,
            "stdin_bytes": len(stdin),
        },
    )
