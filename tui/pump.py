"""Engine events on their way to the UI: collected from any thread, handed over in batches.

The engine (or an attached run's poller) publishes as fast as it likes; the app drains the
pump on a timer. Consecutive log batches of one iteration are merged, progress updates
collapse to the latest of each iteration (handed over last: runs in several slots each have
theirs), and lines beyond `max_pending_lines` are dropped
oldest-first and replaced by one marker line, so memory stays bounded whatever the child
prints."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from engine import events as ev


@dataclass
class _LogBatch:
    iteration: int
    lines: list[str] = field(default_factory=list)
    skipped: int = 0


class EventPump:
    """A thread-safe, bounded buffer of engine events between two UI flushes."""

    def __init__(self, max_pending_lines: int = 5000):
        self.max_pending_lines = max_pending_lines
        self._lock = threading.Lock()
        self._items: list[ev.Event | _LogBatch] = []
        self._pending_lines = 0
        self._progress: dict[int, ev.TrainingProgress] = {}
        self.published = 0
        self.skipped_lines = 0

    def publish(self, event: ev.Event) -> None:
        """Take one event (the engine's `publish` callback; any thread)."""
        with self._lock:
            self.published += 1
            last = self._items[-1] if self._items else None
            if isinstance(event, ev.LogLines):
                if not (isinstance(last, _LogBatch) and last.iteration == event.iteration):
                    last = _LogBatch(event.iteration)
                    self._items.append(last)
                last.lines.extend(event.lines)
                self._pending_lines += len(event.lines)
                self._trim()
            elif isinstance(event, ev.TrainingProgress):
                self._progress.pop(event.iteration, None)  # only the latest matters
                self._progress[event.iteration] = event
            else:
                self._items.append(event)

    def _trim(self) -> None:
        excess = self._pending_lines - self.max_pending_lines
        for item in self._items:
            if excess <= 0:
                break
            if isinstance(item, _LogBatch) and item.lines:
                cut = min(excess, len(item.lines))
                del item.lines[:cut]
                item.skipped += cut
                self._pending_lines -= cut
                self.skipped_lines += cut
                excess -= cut

    def drain(self) -> list[ev.Event]:
        """Everything published since the last drain, in order."""
        with self._lock:
            items, self._items, self._pending_lines = self._items, [], 0
            progress, self._progress = self._progress, {}
        items.extend(progress.values())
        events: list[ev.Event] = []
        for item in items:
            if isinstance(item, _LogBatch):
                lines = item.lines
                if item.skipped:
                    marker = (f"[proctor] {item.skipped} lines skipped to keep up "
                              "(all are in training.log)")
                    lines = [marker, *lines]
                if lines:
                    events.append(ev.LogLines(item.iteration, tuple(lines)))
            else:
                events.append(item)
        return events
