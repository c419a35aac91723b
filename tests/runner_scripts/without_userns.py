"""Runs a command as uid 65534 on a machine where that user cannot create user namespaces
(the sandbox's fallback: Landlock alone). Must be started as root.

    python without_userns.py COMMAND...

It forks a child into a new user and mount namespace (uids 0 and 65534 mapped to themselves),
where `user.max_user_namespaces` is set to 0 for everything below; the child binds the Python
installation past a 0700 /root, becomes uid 65534 without capabilities, and execs COMMAND.
Exits with the command's status."""

from __future__ import annotations

import os
import sys

from engine.runner import sandbox

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
NOBODY = 65534


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    encode = lambda text: None if text is None else text.encode()  # noqa: E731
    sandbox.check(sandbox.libc().mount(encode(source), target.encode(), encode(fstype),
                                       flags, None), f"mount {target}")


def _python_past_root(hold: str) -> None:
    """Make the Python installation reachable for uid 65534 when it lives under /root."""
    python = os.path.realpath(sys.base_prefix)
    if not python.startswith("/root/"):
        return
    os.makedirs(hold, exist_ok=True)
    _mount(python, hold, None, _MS_BIND | _MS_REC)
    _mount("tmpfs", "/root", "tmpfs", 0)
    os.makedirs(python, 0o755)
    _mount(hold, python, None, _MS_BIND | _MS_REC)


def child(ready: int, go: int, command: list[str]) -> None:
    sandbox.check(sandbox.libc().unshare(_CLONE_NEWUSER | _CLONE_NEWNS), "unshare")
    os.write(ready, b"x")
    os.read(go, 1)  # the parent has written our maps: we are uid 0 of our namespace
    with open("/proc/sys/user/max_user_namespaces", "w") as handle:
        handle.write("0")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _python_past_root(f"/tmp/proctor-hold-{os.getpid()}")
    sandbox.drop_privileges(NOBODY)
    os.execvp(command[0], command)


def main(command: list[str]) -> int:
    ready_read, ready_write = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child(ready_write, go_read, command)
        finally:
            os._exit(127)
    os.read(ready_read, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as handle:
            handle.write(f"0 0 1\n{NOBODY} {NOBODY} 1\n")
    os.write(go_write, b"x")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
