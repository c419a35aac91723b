"""The Runner: one run at a time, the same supervision for both modes.

A mode only knows how to start a run's leader (`_spawn`); everything else is here: the
sandbox of the run (and handing its writable paths to the sandbox uid when root), the
environment, containment, the output pipe and log, the results channel of a trusted run,
wall-clock/no-output timeouts, the process limit, stop, cleanup of every process of the run,
classification.
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

from engine.runner import isolation, sandbox
from engine.runner.classify import (
    RESULTS_MAX_BYTES,
    HarnessResults,
    Interruption,
    classify,
    parse_results,
    traceback_tail,
)
from engine.runner.containment import Containment, ContainmentChoice, make_containment
from engine.runner.isolation import ChildSetup, ExitInfo, ProcessIdentity
from engine.runner.output import ChannelReader, OutputSink, PipeReader
from engine.runner.sandbox import SandboxSpec
from engine.runner.types import RunRequest, RunResult, RunStatus

OutputCallback = Callable[[list[str]], None]
StartedCallback = Callable[[ProcessIdentity], None]

_BATCH_INTERVAL_S = 0.1
_POLL_INTERVAL_S = 0.25
_DRAIN_DEADLINE_S = 2.0
_LEADER_EXIT_DEADLINE_S = 60.0
SCRATCH_PREFIX = "proctor-"  # scratch dirs are named proctor-<kind>-<supervisor pid>-…
_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class Launch:
    """What a mode needs to start a run's leader: the request, the setup the leader applies,
    its environment, the fd its stdout/stderr go to, and for a trusted run its fd 3."""

    request: RunRequest
    setup: ChildSetup
    env: dict[str, str]
    output_fd: int
    results_fd: int | None = None


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
    """Runs harness modules in sandboxed fresh processes, one run at a time.

    A Runner belongs to the event loop that first uses it. Creating one makes this process
    non-dumpable, so runs cannot read its /proc/<pid>/environ. `sandbox=False` exists only so
    the overhead benchmark can print the unsandboxed figure next to the sandboxed one."""

    mode: ClassVar[str]

    def __init__(self, *, containment: ContainmentChoice = "auto", sandbox: bool = True) -> None:
        self._containment_choice = containment
        self._sandboxed = sandbox
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
    async def _spawn(self, launch: Launch) -> Spawned:
        """Start the run's leader as `launch` says."""

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
        warnings.extend(await self._sandbox_warnings())
        log_path = Path(request.log_path).absolute()
        sink: OutputSink | None = None
        containment: Containment | None = None
        home: Path | None = None
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            sink = OutputSink(
                log_path,
                log_cap_bytes=int(limits.log_mb * 2**20),
                append=request.append_log,
                mark_prefix=sandbox.MISSING_PREFIX,
            )
            containment, containment_warning = make_containment(
                self._containment_choice, limits.processes
            )
            _remove_stale_scratch()
            home = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}run-{os.getpid()}-"))
            (home / "tmp").mkdir()
            spec = self._sandbox_spec(request, home)
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
        env, refused = isolation.build_environment(request.env, *self._home_and_tmp(home))
        if refused:
            warnings.append(f"refused variables that look like secrets: {', '.join(refused)}")
        setup = ChildSetup(
            workspace=str(Path(request.workspace).resolve()),
            memory_bytes=limits.memory_mb * 2**20 if limits.memory_mb else None,
            file_size_bytes=limits.file_size_mb * 2**20 if limits.file_size_mb else None,
            open_files=limits.open_files,
            cgroup_dir=containment.cgroup_dir,
            sandbox=spec,
            results_channel=request.trusted,
        )
        deliver = _Delivery(on_output, warnings)
        active = _ActiveRun()
        self._active = active
        read_fd, write_fd = os.pipe()
        channel = _ResultsChannel() if request.trusted else None
        transport: asyncio.BaseTransport | None = None
        spawned: Spawned | None = None
        try:
            try:
                spawned = await self._spawn(Launch(
                    request, setup, env, write_fd, channel.write_fd if channel else None))
            finally:
                os.close(write_fd)
                if channel is not None:
                    channel.close_write_end()
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
            if channel is not None:
                await channel.listen()
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
            results, result_warnings = (
                await channel.results() if channel is not None else (None, [])
            )
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
            if channel is not None:
                channel.close()
            sink.finish()
            containment.close()
            shutil.rmtree(home, ignore_errors=True)
            self._active = None
            active.done.set()

        warnings.extend(sink.warnings)
        warnings.extend(result_warnings)
        # The sandbox prints these before any run code; a run can add fakes, never hide one.
        warnings.extend(
            f"SANDBOX LAYER MISSING in this run: {line.removeprefix(sandbox.MISSING_PREFIX)}"
            for line in sink.marked
        )
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

    # -- the sandbox
    async def _sandbox_warnings(self) -> list[str]:
        """One loud line per sandbox layer this machine lacks (probed once per process)."""
        if not self._sandboxed:
            return ["SANDBOX OFF: this runner runs code unsandboxed (benchmark comparison only)"]
        loop = asyncio.get_running_loop()
        missing = await loop.run_in_executor(None, sandbox.missing_layers)
        return [f"SANDBOX LAYER MISSING: {layer.name}: {layer.detail}" for layer in missing]

    def _sandbox_spec(self, request: RunRequest, home: Path) -> SandboxSpec | None:
        """What the run may see; as root, an untrusted run's writable paths become the
        sandbox uid's first."""
        if not self._sandboxed:
            return None
        run_as = sandbox.SANDBOX_UID if os.geteuid() == 0 and not request.trusted else None
        workspace = Path(request.workspace).resolve()
        read_write = [Path(path).resolve() for path in request.read_write]
        if run_as is not None:
            for path in (workspace, *read_write, home):
                _hand_over(path, run_as)
        return SandboxSpec(
            workspace=str(workspace),
            read_only=tuple(str(Path(path).resolve()) for path in request.read_only),
            read_write=tuple(map(str, read_write)),
            hide=tuple(str(Path(path).absolute()) for path in request.hide),
            python_paths=sandbox.python_paths(),
            run_as=run_as,
            scratch=str(home),
            tmp_mb=request.limits.memory_mb or SandboxSpec.tmp_mb,
        )

    def _home_and_tmp(self, home: Path) -> tuple[str, str]:
        """Inside a new root the private /tmp is both; without one, the scratch folder."""
        if self._sandboxed and not any(
            layer.name == "filesystem view" for layer in sandbox.missing_layers()
        ):
            return "/tmp", "/tmp"
        return str(home), str(home / "tmp")

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


class _ResultsChannel:
    """The pipe a trusted run reports on: its write end becomes the child's fd 3; the read end
    is drained while the run goes (so a big report never blocks it) and parsed at the end."""

    def __init__(self) -> None:
        self._read_fd, self.write_fd = os.pipe()
        self._reader = ChannelReader(RESULTS_MAX_BYTES)
        self._transport: asyncio.BaseTransport | None = None

    def close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    async def listen(self) -> None:
        pipe = os.fdopen(self._read_fd, "rb", buffering=0)
        self._read_fd = -1
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(lambda: self._reader, pipe)

    async def results(self) -> tuple[HarnessResults | None, list[str]]:
        """What the run sent, once every holder of the write end is gone."""
        try:
            await asyncio.wait_for(self._reader.eof.wait(), _DRAIN_DEADLINE_S)
        except TimeoutError:
            return None, ["a process outside the run still held the results channel open"]
        return parse_results(bytes(self._reader.data), self._reader.overflowed)

    def close(self) -> None:
        self.close_write_end()
        if self._transport is not None:
            self._transport.close()
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1


def _hand_over(path: Path, uid: int) -> None:
    """chown a tree to `uid` (links themselves, never what they point to)."""
    os.chown(path, uid, uid, follow_symlinks=False)
    for top, folders, files in os.walk(path):
        for name in (*folders, *files):
            os.chown(os.path.join(top, name), uid, uid, follow_symlinks=False)


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
    for path in (*request.read_only, *request.read_write):
        if not Path(path).exists():
            return f"{path} does not exist (it cannot be shown to the run)"
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
