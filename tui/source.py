"""Where the app's events come from and its commands go: the engine in this process, or a
run another process drives (attached). The app sees one interface for both."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from engine import events as ev

if TYPE_CHECKING:
    from engine.attach import AttachedRun
    from engine.loop import Engine

Publish = Callable[[ev.Event], None]


class SourceError(Exception):
    """The run could not be opened; the message is meant for the user."""


class EventSource(Protocol):
    """Runs until the run ends (live) or the viewer quits (attached)."""

    live: bool  # True: the engine runs inside the app, and quitting stops the run

    async def run(self, publish: Publish) -> None: ...

    def send(self, command: ev.Command) -> None: ...

    def close(self) -> None: ...


class EngineSource:
    """The engine as an asyncio task on the app's own loop.

    `open_engine(publish)` builds it (in a thread: agents may import heavy modules, and the
    first paint must not wait for them); it raises SourceError for what the user can fix."""

    live = True

    def __init__(self, open_engine: Callable[[Publish], Engine]):
        self._open_engine = open_engine
        self.engine: Engine | None = None
        self._queued: list[ev.Command] = []
        self.running = False

    async def run(self, publish: Publish) -> None:
        engine = await asyncio.to_thread(self._open_engine, publish)
        self.engine = engine
        for command in self._queued:
            engine.submit(command)
        self._queued.clear()
        self.running = True
        try:
            await engine.run()
        finally:
            self.running = False
            engine.close()

    def send(self, command: ev.Command) -> None:
        if self.engine is None:
            self._queued.append(command)
        else:
            self.engine.submit(command)

    def close(self) -> None:
        """Nothing to release: the engine closes when its task ends."""


class AttachedSource:
    """A run driven by another process, followed through its journal (engine.attach)."""

    live = False

    def __init__(self, run_dir: Path, poll_s: float = 0.25):
        self.run_dir = run_dir
        self.poll_s = poll_s
        self.attached: AttachedRun | None = None
        self._stop = threading.Event()

    async def run(self, publish: Publish) -> None:
        from engine.attach import AttachedRun
        from engine.journal import JournalError

        try:
            attached = await asyncio.to_thread(AttachedRun, self.run_dir)
        except JournalError as exc:
            raise SourceError(str(exc)) from None
        self.attached = attached

        def follow() -> None:
            try:
                attached.follow(publish, self._stop, self.poll_s)
            finally:
                attached.close()  # in the thread that polls, once it has stopped

        await asyncio.to_thread(follow)

    def send(self, command: ev.Command) -> None:
        if self.attached is None:
            raise SourceError("not attached to the run yet")
        self.attached.send(command)

    def close(self) -> None:
        """Stop following; the run itself goes on."""
        self._stop.set()
