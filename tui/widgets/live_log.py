"""The live training log: a bounded ring of the latest lines, fed in batches."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from tui.widgets.line_view import LineView


class LiveLog(LineView):
    """Keeps at most `max_lines` lines (the oldest go first); the run's training.log keeps
    them all."""

    def __init__(self, max_lines: int = 5000, *, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.max_lines = max_lines
        self._lines: deque[str] = deque(maxlen=max_lines)
        self.total_written = 0

    @property
    def line_count(self) -> int:
        return len(self._lines)

    def get_line(self, index: int) -> str:
        return self._lines[index]

    @property
    def lines(self) -> list[str]:
        """A copy of the lines held now (for tests and copying)."""
        return list(self._lines)

    @property
    def buffer(self) -> deque[str]:
        """The ring of lines shown now (another slot's can be shown instead: `show_buffer`)."""
        return self._lines

    def new_buffer(self) -> deque[str]:
        """An empty ring as large as this log's."""
        return deque(maxlen=self.max_lines)

    def show_buffer(self, lines: deque[str]) -> None:
        """Show another ring of lines (e.g. another slot's), following its end."""
        self._lines = lines
        self.reset()
        widest = max((len(line) for line in list(lines)[-200:]), default=0)
        self.content_changed(added=0, widest=widest)

    def write_lines(self, lines: Sequence[str]) -> None:
        """Append a batch of lines."""
        if not lines:
            return
        if len(lines) > self.max_lines:
            lines = lines[-self.max_lines:]
        overflow = max(0, len(self._lines) + len(lines) - self.max_lines)
        self._lines.extend(lines)
        self.total_written += len(lines)
        widest = max(len(line) for line in lines[-200:])
        self.content_changed(added=len(lines), removed_front=overflow, widest=widest)

    def clear(self) -> None:
        self._lines.clear()
        self.reset()
