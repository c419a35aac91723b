"""A run's output: raw chunks in; a capped log file, capped lines in batches, a tail out.

The child's output is untrusted and unbounded (a 10 MB line without newline, an endless
print loop). Memory here stays bounded whatever it prints: a partial line keeps at most
`line_cap` bytes, a pending batch at most `max_pending_lines` lines, the tail a fixed number.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from pathlib import Path

LINE_CAP = 4096
TRUNCATION_MARKER = "[proctor] log truncated"
_BREAK = re.compile(rb"\r\n|\r|\n")


class OutputSink:
    """Consumes a run's output chunks. Lines split on \\n, \\r\\n and \\r. With `append`,
    the log continues an existing file (the cap counts this run's bytes). Lines that start with
    `mark_prefix` are kept in `marked` (the first 20)."""

    def __init__(
        self,
        log_path: Path,
        *,
        log_cap_bytes: int,
        line_cap: int = LINE_CAP,
        tail_lines: int = 200,
        max_pending_lines: int = 1000,
        append: bool = False,
        mark_prefix: str | None = None,
    ) -> None:
        self.log_path = log_path
        self.log_cap_bytes = log_cap_bytes
        self.line_cap = line_cap
        self.max_pending_lines = max_pending_lines
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.last_output_at = time.monotonic()
        self.log_truncated = False
        self.warnings: list[str] = []
        self.mark_prefix = mark_prefix
        self.marked: list[str] = []
        self._log = open(log_path, "ab" if append else "wb")  # noqa: SIM115 (closed in finish)
        self._logged = 0
        self._dropped_bytes = 0
        self._partial = bytearray()
        self._partial_len = 0
        self._skip_lf = False  # the last chunk ended in \r: a leading \n belongs to it
        self._pending: list[str] = []
        self._skipped_lines = 0

    # -- raw bytes
    def feed(self, chunk: bytes) -> None:
        """Take one chunk of raw output."""
        if not chunk:
            return
        self.last_output_at = time.monotonic()
        self._write_log(chunk)
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        start = 0
        for match in _BREAK.finditer(chunk):
            self._extend_partial(chunk[start : match.start()])
            self._end_line()
            start = match.end()
        self._extend_partial(chunk[start:])
        if chunk.endswith(b"\r"):
            self._skip_lf = True

    def _extend_partial(self, piece: bytes) -> None:
        room = self.line_cap - len(self._partial)
        if room > 0:
            self._partial += piece[:room]
        self._partial_len += len(piece)

    def _end_line(self) -> None:
        line = self._partial.decode("utf-8", "replace")
        if self._partial_len > len(self._partial):
            line += f"…[{self._partial_len} bytes]"
        self._partial.clear()
        self._partial_len = 0
        if self.mark_prefix and line.startswith(self.mark_prefix) and len(self.marked) < 20:
            self.marked.append(line)
        self.tail.append(line)
        if len(self._pending) < self.max_pending_lines:
            self._pending.append(line)
        else:
            self._skipped_lines += 1

    def _write_log(self, chunk: bytes) -> None:
        if self._log.closed:
            return
        room = self.log_cap_bytes - self._logged
        if room >= len(chunk):
            self._safe_write(chunk)
            self._logged += len(chunk)
            return
        if not self.log_truncated:
            self._safe_write(chunk[: max(room, 0)])
            self._logged += max(room, 0)
            self.log_truncated = True
            self._safe_write(
                f"\n{TRUNCATION_MARKER} at {_size(self.log_cap_bytes)}: later output is dropped "
                "(the last lines follow at the end)\n".encode()
            )
        self._dropped_bytes += len(chunk) - max(room, 0)

    def _safe_write(self, data: bytes) -> None:
        try:
            self._log.write(data)
        except OSError as exc:  # e.g. disk full: the run goes on, the log stops
            self.warnings.append(f"cannot write the log {self.log_path}: {exc.strerror or exc}")
            self._log.close()

    # -- the caller's side
    def take_batch(self) -> list[str]:
        """The lines completed since the last call (capped; a marker says how many were cut)."""
        batch, self._pending = self._pending, []
        if not self._log.closed:  # viewers in other processes tail the file: no 8 KiB lag
            try:
                self._log.flush()
            except OSError as exc:
                self.warnings.append(f"cannot write the log {self.log_path}: "
                                     f"{exc.strerror or exc}")
                self._log.close()
        if self._skipped_lines:
            batch.append(f"[proctor] … {self._skipped_lines} lines not shown here (see the log)")
            self._skipped_lines = 0
        return batch

    def finish(self) -> None:
        """End of output: complete a last unterminated line, close the log (with the tail
        appended when it was truncated)."""
        if self._partial_len:
            self._end_line()
        if self._log.closed:
            return
        if self.log_truncated:
            last = list(self.tail)[-40:]
            summary = (
                f"{TRUNCATION_MARKER}: {_size(self._dropped_bytes)} of output were dropped; "
                f"the last {len(last)} lines were:\n"
            )
            self._safe_write(summary.encode() + "".join(f"{line}\n" for line in last).encode())
        if not self._log.closed:
            try:
                self._log.close()
            except OSError as exc:
                self.warnings.append(f"cannot write the log {self.log_path}: {exc}")


def _size(count: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if count >= scale:
            return f"{count / scale:.4g} {unit}"
    return f"{count} bytes"


class PipeReader(asyncio.Protocol):
    """Feeds an OutputSink from a pipe; `eof` is set when every writer has closed it."""

    def __init__(self, sink: OutputSink) -> None:
        self.sink = sink
        self.eof = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.sink.feed(data)

    def eof_received(self) -> bool:
        self.eof.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof.set()


class ChannelReader(asyncio.Protocol):
    """Collects what a trusted run writes on its results channel, up to `cap` bytes (more is
    drained and dropped, so the writer never blocks); `eof` is set when every writer closed it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.overflowed = False
        self.eof = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        room = self.cap - len(self.data)
        self.data += data[: max(room, 0)]
        self.overflowed |= len(data) > room

    def eof_received(self) -> bool:
        self.eof.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof.set()
