"""Commands for the engine, from its own process (the app) and from others (the journal)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from engine import events as ev
from engine.journal import Journal

POLL_S = 0.25  # how often the journal is read for commands from other processes


class CommandInbox:
    """One queue of commands in arrival order, whichever process sent them."""

    def __init__(self, journal: Journal, publish: Callable[[ev.Event], None]):
        self.journal = journal
        self.publish = publish
        self._local: asyncio.Queue[ev.Command] = asyncio.Queue()

    def put(self, command: ev.Command) -> None:
        self._local.put_nowait(command)

    def take_all(self) -> list[ev.Command]:
        """Every command waiting now; one another process wrote that this engine cannot
        read is reported and dropped."""
        commands = []
        while not self._local.empty():
            commands.append(self._local.get_nowait())
        for stored in self.journal.take_commands():
            try:
                commands.append(ev.command_from_payload({"kind": stored.kind, **stored.payload}))
            except (KeyError, TypeError):
                self.publish(ev.EngineError(f"ignored a command this engine cannot read "
                                            f"('{stored.kind}')"))
        return commands

    async def next(self) -> ev.Command | None:
        """The next command, waiting up to one poll interval."""
        try:
            return await asyncio.wait_for(self._local.get(), POLL_S)
        except TimeoutError:
            waiting = self.take_all()
            for command in waiting[1:]:
                self._local.put_nowait(command)
            return waiting[0] if waiting else None
