"""A viewer for log files of any size: indexes line offsets, reads only visible lines.

The index (8 bytes a line) is built by a thread worker in chunks and extended as the file
grows (`check`); lines are read with `pread` when drawn. A file that shrinks or is replaced
is indexed again from the start."""

from __future__ import annotations

import os
import re
from array import array
from pathlib import Path

from textual import work
from textual.worker import get_current_worker

from tui.widgets.line_view import LineView

CHUNK = 1 << 20
POST_EVERY = 4 * CHUNK  # the index reaches the UI in batches of this many bytes
MAX_LINE_BYTES = 4096
_NEWLINE = re.compile(rb"\n")


class FileLog(LineView):
    """Shows `path` (None: an empty view with `placeholder`); follows growth at the end."""

    def __init__(self, path: Path | None = None, *, placeholder: str = "",
                 id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.path: Path | None = None
        self.placeholder = placeholder
        self._starts = array("Q", [0])
        self._indexed = 0  # bytes of the file covered by the index
        self._identity: tuple[int, int] | None = None  # (device, inode) indexed
        self._generation = 0
        self._indexing = False
        self._initial = path

    def on_mount(self) -> None:
        super().on_mount()
        if self._initial is not None:
            self.open(self._initial)

    # -- the index -------------------------------------------------------------------------

    @property
    def line_count(self) -> int:
        if self.path is None:
            return 1 if self.placeholder else 0
        count = len(self._starts)
        return count if self._indexed > self._starts[-1] else count - 1

    def get_line(self, index: int) -> str:
        if self.path is None:
            return self.placeholder
        start = self._starts[index]
        end = self._starts[index + 1] - 1 if index + 1 < len(self._starts) else self._indexed
        length = min(end - start, MAX_LINE_BYTES)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return ""
        try:
            raw = os.pread(fd, length, start)
        finally:
            os.close(fd)
        text = raw.decode("utf-8", "replace").rstrip("\r")
        return text if end - start <= MAX_LINE_BYTES else text + f"… [{end - start} bytes]"

    def open(self, path: Path | None) -> None:
        """Show another file (indexed in the background)."""
        self._generation += 1
        self.path = path
        self._starts = array("Q", [0])
        self._indexed = 0
        self._identity = None
        self._indexing = False
        self.reset()
        if path is not None:
            self.check()

    def check(self) -> None:
        """Index what was appended since the last look (cheap when nothing changed)."""
        if self.path is None or self._indexing:
            return
        try:
            stat = os.stat(self.path)
        except OSError:
            return
        identity = (stat.st_dev, stat.st_ino)
        if self._identity is not None and (identity != self._identity
                                           or stat.st_size < self._indexed):
            self.open(self.path)  # replaced or truncated: start over
            return
        self._identity = identity
        if stat.st_size > self._indexed:
            self._indexing = True
            self._index(self.path, self._indexed, stat.st_size, self._generation)

    @work(thread=True, name="index log", group="index", exit_on_error=False)
    def _index(self, path: Path, start: int, end: int, generation: int) -> None:
        worker = get_current_worker()
        starts = array("Q")
        position = start
        posted = start
        try:
            with open(path, "rb") as handle:
                handle.seek(start)
                while position < end and not worker.is_cancelled:
                    chunk = handle.read(min(CHUNK, end - position))
                    if not chunk:
                        break
                    starts.extend(match.end() + position for match in _NEWLINE.finditer(chunk))
                    position += len(chunk)
                    if position - posted >= POST_EVERY:
                        self.app.call_from_thread(self._extend, starts, position, generation,
                                                  False)
                        starts, posted = array("Q"), position
        finally:
            if not worker.is_cancelled:
                self.app.call_from_thread(self._extend, starts, position, generation, True)

    def _extend(self, starts: array, indexed: int, generation: int, done: bool) -> None:
        """Take a batch of line starts from the indexing thread (on the UI thread)."""
        if generation != self._generation:
            return  # a file this view no longer shows
        before = self.line_count
        edges = [self._starts[-1], *starts, indexed]
        widest = max((b - a for a, b in zip(edges, edges[1:], strict=False)), default=0)
        self._starts.extend(starts)
        self._indexed = indexed
        if done:
            self._indexing = False
        self._cache.discard(before - 1)  # the last line may have grown
        self.content_changed(added=self.line_count - before, widest=min(widest, MAX_LINE_BYTES))
