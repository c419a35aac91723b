"""An event source whose events a test publishes by hand: the app as it meets any engine,
without one. Commands the app sends are kept."""

from __future__ import annotations

import asyncio

from engine import events as ev


class FeedSource:
    """Events a test publishes by hand (an attached-looking source); commands are kept."""

    live = False

    def __init__(self) -> None:
        self.publish = None
        self.commands: list[ev.Command] = []

    async def run(self, publish) -> None:
        self.publish = publish
        await asyncio.Event().wait()  # until the app quits

    def send(self, command: ev.Command) -> None:
        self.commands.append(command)

    def close(self) -> None:
        pass
