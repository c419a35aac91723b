"""Zygote mode (the default): runs are forked from a helper that has already imported torch.

The supervisor keeps one zygote (see `zygote_server.py`) per runner, started lazily on the
first run and restarted on the next run after it dies or when the run environment changes.
Per run it sends the request and the write end of the run's output pipe (SCM_RIGHTS), and
for a trusted run the write end of its results channel; the supervisor reads both itself,
and the zygote reports the leader's pid, start time, exit status and peak RSS. If no zygote
can be started the run falls back to a fresh subprocess, with a warning.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from engine.runner import isolation
from engine.runner.containment import ContainmentChoice
from engine.runner.isolation import ExitInfo, ProcessIdentity
from engine.runner.runner import SCRATCH_PREFIX, Launch, Runner, Spawned
from engine.runner.subprocess_mode import spawn_subprocess

# torch._dynamo too: an optimizer's constructor imports it (over a second, paid per run
# otherwise). Importing it runs no torch operation and does not touch CUDA.
DEFAULT_PRELOAD = ("numpy", "torch", "torch._dynamo")
_READY_DEADLINE_S = 300.0
# Per-run variables; any other difference means the zygote's imports saw another environment.
_PER_RUN_VARIABLES = frozenset({"HOME", "TMPDIR", "CUDA_VISIBLE_DEVICES"})


class ZygoteLost(RuntimeError):
    """The zygote died or closed its channel."""


class _Zygote:
    """One live zygote process and its control channel."""

    def __init__(self, pid: int, sock: socket.socket, home: Path, env_key: dict[str, str]):
        self.pid = pid
        self.sock = sock
        self.home = home
        self.env_key = env_key
        self.dead: str | None = None
        self.warnings: tuple[str, ...] = ()
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[dict] = loop.create_future()
        self._started: dict[int, asyncio.Future[dict]] = {}
        self._exits: dict[int, asyncio.Future[ExitInfo]] = {}
        self._ids = itertools.count()
        self.exited = asyncio.ensure_future(isolation.wait_for_exit(pid))
        self._pump = asyncio.ensure_future(self._read_messages())

    @classmethod
    async def start(cls, env: dict[str, str], preload: Sequence[str]) -> _Zygote:
        home = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}zygote-{os.getpid()}-"))
        (home / "tmp").mkdir()
        zygote_env = dict(env, HOME=str(home), TMPDIR=str(home / "tmp"))
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.posix_spawn(
                sys.executable,
                [
                    sys.executable,
                    "-m",
                    "engine.runner.zygote_server",
                    "--control-fd",
                    "3",
                    "--parent-pid",
                    str(os.getpid()),
                    "--preload",
                    ",".join(preload),
                ],
                zygote_env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
                ],
                setsid=True,  # Ctrl-C in the supervisor's terminal is the supervisor's to handle
            )
        except OSError:
            ours.close()
            shutil.rmtree(home, ignore_errors=True)
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        zygote = cls(pid, ours, home, _env_key(env))
        try:
            ready = await asyncio.wait_for(asyncio.shield(zygote._ready), _READY_DEADLINE_S)
        except (TimeoutError, ZygoteLost):
            await zygote.close()
            raise
        if ready.get("fatal"):
            await zygote.close()
            raise ZygoteLost(ready["fatal"])
        zygote.warnings = tuple(ready.get("warnings", ()))
        return zygote

    async def _read_messages(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    break
                self._dispatch(json.loads(data))
        except (OSError, ValueError) as exc:
            self.dead = f"the zygote's channel failed: {exc}"
        self.dead = self.dead or "the zygote exited"
        lost = ZygoteLost(self.dead)
        for future in (self._ready, *self._started.values()):
            if not future.done():
                future.set_exception(lost)
        for future in self._exits.values():
            if not future.done():
                future.set_result(ExitInfo(None, lost=f"{self.dead} during the run"))

    def _dispatch(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "ready" and not self._ready.done():
            self._ready.set_result(message)
        elif kind in ("started", "failed"):
            waiter = self._started.pop(message.get("id"), None)
            if kind == "started":
                # Created here, in message order, so an exit right after the start is not lost.
                self._exits[message["pid"]] = asyncio.get_running_loop().create_future()
            if waiter is not None and not waiter.done():
                if kind == "started":
                    waiter.set_result(message)
                else:
                    waiter.set_exception(ZygoteLost(message.get("error", "start failed")))
        elif kind == "exit":
            future = self._exits.pop(message["pid"], None)
            if future is not None and not future.done():
                future.set_result(ExitInfo(message["status"], message.get("maxrss_kb")))

    async def spawn(self, launch: Launch) -> Spawned:
        request, setup = launch.request, launch.setup
        env, output_fd, results_fd = launch.env, launch.output_fd, launch.results_fd
        request_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._started[request_id] = waiter
        message = {
            "id": request_id,
            "harness": request.harness,
            "argv": list(request.argv),
            "env": env,
            "setup": json.loads(setup.to_json()),
        }
        fds = [output_fd] if results_fd is None else [output_fd, results_fd]
        try:
            socket.send_fds(self.sock, [json.dumps(message).encode()], fds)
        except OSError as exc:
            self._started.pop(request_id, None)
            raise ZygoteLost(f"cannot reach the zygote: {exc}") from None
        started = await waiter
        pid = started["pid"]
        ended = self._exits.get(pid) or asyncio.get_running_loop().create_future()

        def abandon() -> None:
            self._exits.pop(pid, None)

        return Spawned(
            identity=ProcessIdentity(pid, pid, started["start_time"], setup.cgroup_dir),
            walk_root=self.pid,
            ended=ended,
            abandon=abandon,
        )

    async def close(self) -> None:
        """Close the channel (the zygote exits on EOF) and reap it; kill it if it lingers."""
        self.sock.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), 5.0)
        except TimeoutError:
            isolation.signal_run(None, [self.pid], signal.SIGKILL)
            await self.exited
        self._pump.cancel()
        shutil.rmtree(self.home, ignore_errors=True)


def _env_key(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in _PER_RUN_VARIABLES}


class ZygoteRunner(Runner):
    """Forks each run from a zygote that has imported `preload` (default numpy and torch)."""

    mode = "zygote"

    def __init__(
        self,
        *,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        containment: ContainmentChoice = "auto",
        sandbox: bool = True,
    ) -> None:
        super().__init__(containment=containment, sandbox=sandbox)
        self._preload = tuple(preload)
        self._zygote: _Zygote | None = None

    @property
    def zygote_pid(self) -> int | None:
        """The live zygote's pid, if one is running."""
        return self._zygote.pid if self._zygote is not None and not self._zygote.dead else None

    async def _spawn(self, launch: Launch) -> Spawned:
        problem = ""
        for _ in range(2):  # a zygote found dead at the send gets one replacement
            zygote = self._zygote
            stale = zygote is not None and (
                zygote.dead
                or zygote.env_key != _env_key(launch.env)
                or not isolation.is_running(zygote.pid)
            )
            if stale:
                await self._close_mode()
            fresh = self._zygote is None
            try:
                if self._zygote is None:
                    self._zygote = await _Zygote.start(launch.env, self._preload)
                spawned = await self._zygote.spawn(launch)
            except (OSError, ZygoteLost, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
                await self._close_mode()
                if fresh:
                    break  # a zygote that cannot start now will not start on a retry either
                continue
            if fresh:
                spawned.warnings = self._zygote.warnings
            return spawned
        spawned = spawn_subprocess(launch)
        spawned.warnings = (f"zygote unavailable ({problem}); this run used a fresh subprocess",)
        return spawned

    async def _close_mode(self) -> None:
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            await zygote.close()
