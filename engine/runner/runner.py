"""The Runner: one run at a time, the same supervision for both modes.

A mode only knows how to start a run's leader (`_spawn`); everything else is here: the
scratch HOME and environment, containment, the output pipe and log, wall-clock/no-output
timeouts, the process limit, stop, cleanup of every process of the run, classification.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from engine.runner import isolation
from engine.runner.classify import Interruption, classify, read_results, traceback_tail
from engine.runner.containment import Containment, ContainmentChoice, make_containment
from engine.runner.isolation import ChildSetup, ExitInfo, ProcessIdentity
from engine.runner.output import OutputSink, PipeReader
from engine.runner.types import RunRequest, RunResult, RunStatus

OutputCallback = Callable[[list[str]], None]
StartedCallback = Callable[[ProcessIdentity], None]

_BATCH_INTERVAL_S = 0.1
_POLL_INTERVAL_S = 0.25
_DRAIN_DEADLINE_S = 2.0
_LEADER_EXIT_DEADLINE_S = 60.0
SCRATCH_PREFIX = "proctor-"  # scratch dirs are named proctor-<kind>-<supervisor pid>-…
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass
class Spawned:
    """A started run leader, as a mode hands it over."""

    identity: ProcessIdentity
    walk_root: int  # where a process-tree containment starts looking for the run's processes
    ended: asyncio.Future[ExitInfo]
    abandon: Callable[[], None]  # forget the run after it was killed (cancellation path)
    warnings: tuple[str, ...] = ()


@dataclass
class _ActiveRun:
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Runner(ABC):
    """Runs harness modules in isolated fresh processes, one run at a time.

    A Runner belongs to the event loop that first uses it. Creating one makes this process
    non-dumpable, so runs cannot read its /proc/<pid>/environ."""

    mode: ClassVar[str]

    def __init__(self, *, containment: ContainmentChoice = "auto") -> None:
        self._containment_choice = containment
        self._lock: asyncio.Lock | None = None
        self._active: _ActiveRun | None = None
        self._closed = False
        self._dumpable_warning = (
            None
            if isolation.make_non_dumpable()
            else "the supervisor could not make itself "
            "non-dumpable: runs may read its /proc/<pid>/environ"
        )

    # -- public API
    async def run(
        self,
        request: RunRequest,
        on_output: OutputCallback | None = None,
        on_started: StartedCallback | None = None,
    ) -> RunResult:
        """Run one request to completion. `on_started` gets the leader's identity before any
        output is read; `on_output` gets batches of lines at most every ~100 ms."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed:
                raise RuntimeError("this runner is closed")
            problem = _request_problem(request)
            if problem is not None:
                return _refused(problem)
            return await self._run_one(request, on_output, on_started)

    async def stop_current(self) -> None:
        """Stop the run in progress, if any (its whole group is killed; status STOPPED), and
        wait until it is cleaned up."""
        active = self._active
        if active is not None:
            active.stop.set()
            await active.done.wait()

    async def aclose(self) -> None:
        """Stop any run and release the mode's resources (the zygote)."""
        self._closed = True
        await self.stop_current()
        await self._close_mode()

    # -- what a mode provides
    @abstractmethod
    async def _spawn(
        self, request: RunRequest, setup: ChildSetup, env: dict[str, str], output_fd: int
    ) -> Spawned:
        """Start the run's leader with `setup` applied, stdout/stderr on `output_fd`."""

    async def _close_mode(self) -> None:
        return None

    # -- one run
    async def _run_one(
        self,
        request: RunRequest,
        on_output: OutputCallback | None,
        on_started: StartedCallback | None,
    ) -> RunResult:
        started_at = time.monotonic()
        limits = request.limits
        warnings: list[str] = [self._dumpable_warning] if self._dumpable_warning else []
        results_path = Path(request.results_path).absolute()
        log_path = Path(request.log_path).absolute()
        sink: OutputSink | None = None
        containment: Containment | None = None
        home: Path | None = None
        try:
            results_path.unlink(missing_ok=True)  # a stale result must never count for this run
            results_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            sink = OutputSink(log_path, log_cap_bytes=int(limits.log_mb * 2**20))
            containment, containment_warning = make_containment(
                self._containment_choice, limits.processes
            )
            _remove_stale_scratch()
            home = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}run-{os.getpid()}-"))
            (home / "tmp").mkdir()
        except (OSError, RuntimeError) as exc:
            if sink is not None:
                sink.finish()
            if containment is not None:
                containment.close()
            if home is not None:
                shutil.rmtree(home, ignore_errors=True)
            return _refused(f"cannot prepare the run: {exc}")
        if containment_warning:
            warnings.append(containment_warning)
        env, refused = isolation.build_environment(request.env, str(home))
        if refused:
            warnings.append(f"refused variables that look like secrets: {', '.join(refused)}")
        network_problem = isolation.network_isolation_problem()
        if network_problem is not None:
            warnings.append(f"runs have network access (no network namespace: {network_problem})")
        setup = ChildSetup(
            workspace=str(Path(request.workspace).absolute()),
            memory_bytes=limits.memory_mb * 2**20 if limits.memory_mb else None,
            file_size_bytes=limits.file_size_mb * 2**20 if limits.file_size_mb else None,
            open_files=limits.open_files,
            cgroup_dir=containment.cgroup_dir,
            new_network=network_problem is None,
            drop_privileges=True,
        )
        deliver = _Delivery(on_output, warnings)
        active = _ActiveRun()
        self._active = active
        read_fd, write_fd = os.pipe()
        transport: asyncio.BaseTransport | None = None
        spawned: Spawned | None = None
        try:
            try:
                spawned = await self._spawn(request, setup, env, write_fd)
            finally:
                os.close(write_fd)
            warnings.extend(spawned.warnings)
            sink.last_output_at = time.monotonic()  # silence counts from the start, not the spawn
            ended_at: list[float] = []
            spawned.ended.add_done_callback(lambda _: ended_at.append(time.monotonic()))
            containment.attach(spawned.identity.pid, spawned.walk_root)
            reader = PipeReader(sink)
            loop = asyncio.get_running_loop()
            pipe = os.fdopen(read_fd, "rb", buffering=0)
            read_fd = -1
            transport, _ = await loop.connect_read_pipe(lambda: reader, pipe)
            if on_started is not None:
                on_started(spawned.identity)

            interruption = await self._watch(request, spawned, containment, sink, active, deliver)
            ended = await _leader_exit(spawned)
            limit_hit = containment.limit_exceeded()
            if containment.members():  # nothing of the run may outlive its leader
                await isolation.terminate_run(
                    spawned.identity.pgid,
                    containment.members,
                    request.timeouts.kill_grace_s,
                    lambda: True,
                )
            try:
                await asyncio.wait_for(reader.eof.wait(), _DRAIN_DEADLINE_S)
            except TimeoutError:
                warnings.append("a process outside the run still held its output open")
            sink.finish()
            deliver(sink.take_batch())
            wall_s = (ended_at[0] if ended_at else time.monotonic()) - started_at
        except BaseException:
            if spawned is not None:  # cancelled or on_started failed: nothing may survive
                pgid = spawned.identity.pgid
                isolation.kill_run_now(pgid, containment.members)
                spawned.abandon()
            raise
        finally:
            if transport is not None:
                transport.close()
            if read_fd >= 0:
                os.close(read_fd)
            sink.finish()
            containment.close()
            shutil.rmtree(home, ignore_errors=True)
            self._active = None
            active.done.set()

        warnings.extend(sink.warnings)
        results, result_warnings = read_results(results_path)
        warnings.extend(result_warnings)
        tail = traceback_tail(list(sink.tail))
        verdict = classify(request, ended, interruption, results, tail, limit_hit)
        ok = verdict.status is RunStatus.OK and results is not None
        return RunResult(
            status=verdict.status,
            exit_code=verdict.exit_code,
            signal=verdict.signal,
            metrics=results.metrics if ok and results else {},
            hyperparameters=results.hyperparameters if results else {},
            error=verdict.error,
            traceback_tail="" if verdict.status is RunStatus.OK else tail,
            wall_s=wall_s,
            peak_rss_mb=ended.maxrss_kb / 1024 if ended.maxrss_kb is not None else None,
            log_truncated=sink.log_truncated,
            warnings=tuple(dict.fromkeys(warnings)),
        )

    async def _watch(
        self,
        request: RunRequest,
        spawned: Spawned,
        containment: Containment,
        sink: OutputSink,
        active: _ActiveRun,
        deliver: _Delivery,
    ) -> Interruption | None:
        """Wait for the leader to exit, delivering output batches, enforcing timeouts and the
        process limit; returns why we ended the run ourselves, if we did."""
        timeouts = request.timeouts
        start = time.monotonic()
        wall_deadline = start + timeouts.wall_s
        next_poll = start + _POLL_INTERVAL_S
        stop_waiter = asyncio.ensure_future(active.stop.wait())
        try:
            while not spawned.ended.done():
                now = time.monotonic()
                silent_deadline = sink.last_output_at + timeouts.no_output_s
                interruption = None
                if active.stop.is_set():
                    interruption = Interruption.STOPPED
                elif now >= wall_deadline:
                    interruption = Interruption.WALL_TIMEOUT
                elif now >= silent_deadline:
                    interruption = Interruption.NO_OUTPUT_TIMEOUT
                elif now >= next_poll:
                    containment.poll()
                    next_poll = now + _POLL_INTERVAL_S
                    if containment.limit_exceeded():
                        interruption = Interruption.PROCESS_LIMIT
                if interruption is not None:
                    await isolation.terminate_run(
                        spawned.identity.pgid,
                        containment.members,
                        timeouts.kill_grace_s,
                        spawned.ended.done,
                    )
                    return interruption
                deliver(sink.take_batch())
                wake_in = min(_BATCH_INTERVAL_S, wall_deadline - now, silent_deadline - now)
                await asyncio.wait(
                    {spawned.ended, stop_waiter},
                    timeout=max(wake_in, 0.005),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            return None
        finally:
            stop_waiter.cancel()


async def _leader_exit(spawned: Spawned) -> ExitInfo:
    try:
        return await asyncio.wait_for(asyncio.shield(spawned.ended), _LEADER_EXIT_DEADLINE_S)
    except TimeoutError:
        return ExitInfo(None, lost="the run's leader did not exit after SIGKILL")


class _Delivery:
    """Hands batches to the caller's callback; a failing callback is reported once and then
    left alone, never allowed to break the run."""

    def __init__(self, callback: OutputCallback | None, warnings: list[str]) -> None:
        self._callback = callback
        self._warnings = warnings

    def __call__(self, batch: list[str]) -> None:
        if not batch or self._callback is None:
            return
        try:
            self._callback(batch)
        except Exception as exc:  # a UI bug must not kill a training run
            self._warnings.append(f"the output callback failed and was dropped: {exc!r}")
            self._callback = None


@functools.cache
def _remove_stale_scratch() -> None:
    """Remove scratch HOMEs left by supervisors that were killed (once per process)."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*-*"):
        owner = path.name.split("-")[2]
        if owner.isdigit() and not isolation.is_running(int(owner)):
            shutil.rmtree(path, ignore_errors=True)


def _request_problem(request: RunRequest) -> str | None:
    if not Path(request.workspace).is_dir():
        return f"workspace {request.workspace} is not a directory"
    if not _MODULE_NAME.match(request.harness):
        return f"harness {request.harness!r} is not a module name"
    return None


def _refused(problem: str) -> RunResult:
    return RunResult(
        status=RunStatus.FAILED,
        exit_code=None,
        signal=None,
        metrics={},
        hyperparameters={},
        error=problem,
        traceback_tail="",
        wall_s=0.0,
        peak_rss_mb=None,
        log_truncated=False,
    )
