"""The live training log of every slot: a bounded ring of lines per slot, one shown at a time.

Each run's lines start with a heading (`── iteration 7: training node 7 ──`), written before
its first lines, so a silent run leaves none. With one slot this is the app's one live log."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from engine import events as ev
from tui.widgets.live_log import LiveLog


class SlotLogs:
    """Routes each run's lines to its slot's ring; `view` draws the shown slot's."""

    def __init__(self, view: LiveLog):
        self.view = view
        self.shown = 1
        self._buffers: dict[int, deque[str]] = {1: view.buffer}
        self._iteration: dict[int, int] = {}  # slot -> the iteration its last lines came from
        self._heading: dict[int, tuple[int, str]] = {}  # slot -> (iteration, heading) of its run

    def started(self, event: ev.TrainingStarted, slot: int) -> None:
        """A run starts in `slot`: its first lines get a heading (a repair re-runs the same
        iteration, and gets one again)."""
        self._iteration.pop(slot, None)
        self._heading[slot] = (event.iteration, f"── iteration {event.iteration}: training "
                                                f"node {event.node_id} ──")

    def write(self, slot: int, iteration: int, lines: Sequence[str]) -> None:
        """Append a batch of `iteration`'s lines to `slot`'s log."""
        batch = list(lines)
        if self._iteration.get(slot) != iteration:
            self._iteration[slot] = iteration
            started, heading = self._heading.get(slot, (None, ""))
            batch.insert(0, heading if started == iteration else f"── iteration {iteration} ──")
        if slot == self.shown:
            self.view.write_lines(batch)
        else:
            self._buffer(slot).extend(batch)

    def show(self, slot: int) -> None:
        """Show `slot`'s log in the view."""
        if slot != self.shown:
            self.shown = slot
            self.view.show_buffer(self._buffer(slot))

    def lines(self, slot: int) -> list[str]:
        """A copy of the lines `slot`'s log holds now."""
        return list(self._buffer(slot))

    def _buffer(self, slot: int) -> deque[str]:
        if slot not in self._buffers:
            self._buffers[slot] = self.view.new_buffer()
        return self._buffers[slot]
