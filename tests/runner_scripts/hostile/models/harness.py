"""Hostile training code: tries every way out of its sandbox that the case lists, and notes in
./report.json what each attempt gave ("denied: ..." or "GOT: ..."), plus what it must still
be able to do. Unless the case says "daemon": false, it leaves a double-forked, setsid()
daemon behind, noted in ./pids.txt."""

import json
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

from models import fakekit


def attempt(action) -> str:
    try:
        return f"GOT: {str(action())[:80]}"
    except Exception as exc:  # noqa: BLE001 (any failure is a denial)
        return f"denied: {type(exc).__name__}: {exc}"


def read(path: str):
    return lambda: Path(path).read_bytes()


def write(path: str, text: str = "planted by hostile code\n"):
    def action() -> str:
        with open(path, "a") as handle:
            handle.write(text)
        return f"wrote {path}"

    return action


def connect(family: int, address):
    def action() -> str:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(address)
        return f"connected to {address!r}"

    return action


def kill(pid: int, sig: int):
    return lambda: os.kill(pid, sig) or f"signalled {pid}"


def attacks(case: dict) -> dict:
    found = {
        "environ of the test": read(f"/proc/{case['test_pid']}/environ"),
        "environ of its parent": read(f"/proc/{case['parent_pid']}/environ"),
        "key file in the home": read(case["key_file"]),
        "key file hidden in read-only data": read(case["hidden_key"]),
        "tcp to 127.0.0.1": connect(socket.AF_INET, ("127.0.0.1", case["tcp_port"])),
        "unix socket path": connect(socket.AF_UNIX, case["unix_socket"]),
        "abstract unix socket": connect(socket.AF_UNIX, "\0" + case["abstract_name"]),
        "file next to the workspace": write(case["outside_file"]),
        "git hook": write(os.path.join(case["git_dir"], "hooks", "pre-commit"),
                          "#!/bin/sh\ntouch /tmp/hooked\n"),
        "git config": write(os.path.join(case["git_dir"], "config"),
                            "[gpg]\n\tprogram = /tmp/evil\n"),
        "venv site-packages": write(case["planted_pth"], "import os\n"),
        "read-only data": write(os.path.join(case["data_dir"], "planted.txt")),
        "signal the test": kill(case["test_pid"], signal.SIGUSR1),
        "signal pid 1": kill(1, signal.SIGTERM),
    }
    for number, path in enumerate(case["cgroup_procs"]):
        found[f"cgroup.procs {number}"] = write(path, f"{os.getpid()}\n")
    return found


def positives(case: dict) -> dict:
    def imports() -> str:
        import numpy
        import torch

        return f"numpy {numpy.__version__}, torch {torch.ones(2).sum().item()}"

    return {
        "write the workspace": write("written.txt"),
        "write its tmp": write(os.path.join(tempfile.gettempdir(), case["private_tmp_name"])),
        "read the read-only data": read(os.path.join(case["data_dir"], "data.txt")),
        "import numpy and torch": imports,
    }


def leave_daemon() -> None:
    """A grandchild in its own session, reparented away from us: it must not outlive the run."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            fakekit.note_pid()
            time.sleep(60)
        os._exit(0)
    os.wait()
    deadline = time.monotonic() + 5
    while len(Path("pids.txt").read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)


if __name__ == "__main__":
    case = fakekit.args()
    fakekit.note_pid()
    if case.get("daemon", True):
        leave_daemon()
    report = {
        "attacks": {name: attempt(action) for name, action in attacks(case).items()},
        "positives": {name: attempt(action) for name, action in positives(case).items()},
        "uid": os.getuid(),
    }
    Path("report.json").write_text(json.dumps(report, indent=1))
    print("hostile harness done", flush=True)
    fakekit.write_results("ok")  # a trusted run must report to count as done
