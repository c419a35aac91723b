"""Subprocess mode, the reference: every run execs a fresh Python.

The leader is `python -I -S isolation.py SETUP -- python -m <harness> ...`, spawned with
posix_spawn (no fork of the supervisor, safe with threads) in a new session; the launcher
applies the setup (the sandbox forks the harness process below it) and execs the harness
there. A trusted run's results channel is the launcher's fd 3, kept open across the exec."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from engine.runner import isolation
from engine.runner.isolation import ProcessIdentity
from engine.runner.runner import Launch, Runner, Spawned


def spawn_subprocess(launch: Launch) -> Spawned:
    """Start a run as a fresh interpreter; must be called from the event loop's thread (the
    leader's parent-death signal is tied to the thread that spawned it)."""
    request, setup, env = launch.request, launch.setup, launch.env
    output_fd, results_fd = launch.output_fd, launch.results_fd
    argv = [
        sys.executable,
        "-I",
        "-S",
        isolation.__file__,
        setup.to_json(),
        "--",
        sys.executable,
        "-m",
        request.harness,
        *request.argv,
    ]
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, output_fd, 1),
        (os.POSIX_SPAWN_DUP2, output_fd, 2),
    ]
    if results_fd is not None:
        file_actions.append((os.POSIX_SPAWN_DUP2, results_fd, 3))
    pid = os.posix_spawn(sys.executable, argv, env, file_actions=file_actions, setsid=True)
    stat = isolation.read_stat(pid)  # unreaped, so it is there even if the child already exited
    assert stat is not None
    ended = asyncio.ensure_future(isolation.wait_for_exit(pid))

    def abandon() -> None:
        ended.cancel()
        with contextlib.suppress(ChildProcessError):  # SIGKILLed just now: reap it here
            os.waitpid(pid, 0)

    return Spawned(
        identity=ProcessIdentity(pid, pid, stat.start_time, setup.cgroup_dir),
        walk_root=pid,
        ended=ended,
        abandon=abandon,
    )


class SubprocessRunner(Runner):
    """Executes a fresh `python -m <harness>` per run."""

    mode = "subprocess"

    async def _spawn(self, launch: Launch) -> Spawned:
        return spawn_subprocess(launch)
