"""The human-readable files of one run under `log/<run>/`, in the original system's formats.

`analysis.md` and `reasoning.log` are append-only and crash-safe: after each fsynced append
the file's new length is recorded in the journal's state table, and the engine's `RunLogs`
truncates a longer file back to that length on open (a torn or unrecorded append after a
SIGKILL), so a resumed run re-appends an entry exactly once. Everything else is written
whole through `write_atomic`. Only the engine (which holds the run lock) passes a state
store; readers such as the TUI open `RunLogs(run_dir)` and never modify anything on open.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import yaml

from engine.atomic import fsync_directory, write_atomic
from engine.memory import MEMORY_TEMPLATE, Memory, insert_do_not_retry, memory_warning
from engine.paths import RunPaths
from engine.proposal import Proposal
from engine.tree import Node, NodeStatus

# libyaml when present: the pure-Python emitter costs milliseconds per config snapshot.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

ANALYSIS_END_KEY = "analysis_end"
REASONING_END_KEY = "reasoning_end"
TORN_SUFFIX = ".torn"  # repaired tails are moved here, never silently dropped
# How many appended keys a log remembers to refuse duplicates (covers parallel slots that
# finish out of order; the engine never re-records an iteration older than that).
RECENT_KEYS = 256
CHUNK = 1 << 20
TEXT_FIELD_LIMIT = 4000  # chars of one agent-written field in an analysis entry
ERROR_LINE_LIMIT = 300


class LogsError(Exception):
    """A log file that cannot be written as asked; the message is meant for the user."""


class StateStore(Protocol):
    """Durable key-value state; `engine.journal.Journal` is one."""

    def state(self, key: str, default: Any = None) -> Any: ...

    def set_state(self, key: str, value: Any) -> None: ...


# -- text formatting --------------------------------------------------------------------------

# ANSI escape sequences first (so their parameters go too), then other control characters,
# then bidi overrides that could make untrusted text read differently from what it is.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_WHITESPACE = re.compile(r"\s+")


def strip_control(text: str) -> str:
    """Remove escape sequences and control characters except newline and tab; bytes that
    were not UTF-8 (a command line's surrogate escapes) become U+FFFD, so the text can be
    written anywhere."""
    if not text.isascii():
        try:
            raw = text.encode("utf-8", "surrogateescape")  # the bytes the text came from
        except UnicodeEncodeError:  # a surrogate no decoder made
            raw = text.encode("utf-8", "replace")
        text = raw.decode("utf-8", "replace")
    return _CONTROL.sub("", _ANSI.sub("", text))


def one_line(text: str | None, limit: int = TEXT_FIELD_LIMIT) -> str:
    """Outside text on a single line, cleaned and cut to `limit` characters: a newline in it
    cannot forge another entry's heading or bullet."""
    flat = _WHITESPACE.sub(" ", strip_control(text or "")).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def format_number(value: Any) -> str:
    """A config value in the original's style: `2E-5` for small floats, `50.0` otherwise."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0.0"
    if abs(value) < 0.01 or abs(value) >= 1e6:
        mantissa, exponent = f"{value:.5e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}E{int(exponent)}"
    text = f"{value:.6g}"
    return text if "." in text else text + ".0"


def _format_mse(value: float | None) -> str:
    """`4.1E-03`, as in the original's Metrics line."""
    if value is None or not math.isfinite(value):
        return "nan"
    mantissa, exponent = f"{value:.2E}".split("E")
    mantissa = mantissa.rstrip("0")
    return f"{mantissa}0E{exponent}" if mantissa.endswith(".") else f"{mantissa}E{exponent}"


def _fixed(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "nan"
    return f"{value:.{digits}f}"


def quality_word(r2: float) -> str:
    """excellent > 0.95, good 0.90-0.95, moderate 0.75-0.90, poor < 0.75 (NaN: poor)."""
    if not math.isfinite(r2):
        return "poor"
    if r2 > 0.95:
        return "excellent"
    if r2 >= 0.90:
        return "good"
    if r2 >= 0.75:
        return "moderate"
    return "poor"


def _measured_r2(node: Node | None) -> float:
    """The evaluator's final_r2 of a node that ran to the end; NaN otherwise."""
    if node is None or node.status is not NodeStatus.DONE:
        return math.nan
    value = node.metrics.get("final_r2")
    return float(value) if value is not None else math.nan


def _lookup(config: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _config_line(config: dict[str, Any], keys: Sequence[str]) -> str:
    leaves = [key.rsplit(".", 1)[-1] for key in keys]
    parts = []
    for key, leaf in zip(keys, leaves, strict=True):
        found, value = _lookup(config, key)
        if found:
            # A leaf name shared by two keys (e.g. two `seed`s) keeps its dotted name.
            name = leaf if leaves.count(leaf) == 1 else key
            parts.append(f"{name}={format_number(value)}")
    return ", ".join(parts)


def _metrics_line(node: Node, error: str | None) -> str:
    if node.status is not NodeStatus.DONE:
        first = _error_line(error)
        text = f"status={node.status}"
        return text + (f", error={one_line(first, ERROR_LINE_LIMIT)}" if first else "")
    metrics = node.metrics
    seconds = metrics.get("training_time_s")
    minutes = seconds / 60 if seconds is not None else metrics.get("training_time_min")
    heldout = metrics.get("heldout_r2")
    return (
        f"final_r2={_fixed(metrics.get('final_r2'))}, "
        + (f"heldout_r2={_fixed(heldout)}, " if heldout is not None else "")
        + f"final_mse={_format_mse(metrics.get('final_mse'))}, "
        f"slope={_fixed(metrics.get('slope'))}, "
        f"training_time={_fixed(minutes, 1)}min"
    )


def _error_line(error: str | None) -> str:
    """The error's first line; for a Python traceback, its last line (the exception)."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if lines[0].startswith("Traceback (most recent call last)") else lines[0]


def _observation(node: Node, parent: Node | None, analysis_text: str) -> str:
    r2, parent_r2 = _measured_r2(node), _measured_r2(parent)
    if node.parent_id is None:
        compared = (
            f"R2 {_fixed(r2)} (no parent)." if math.isfinite(r2) else f"no R2 ({node.status})."
        )
    elif not math.isfinite(r2):
        compared = f"no R2 ({node.status}); parent R2 {_fixed(parent_r2)}."
    elif not math.isfinite(parent_r2):
        compared = f"R2 {_fixed(r2)} vs nan (parent)."
    else:
        # The delta of the printed values, so the line's arithmetic checks out.
        delta = round(r2, 3) - round(parent_r2, 3)
        compared = f"R2 {_fixed(r2)} vs {_fixed(parent_r2)} (parent): {delta:+.3f}."
    text = one_line(analysis_text)
    return f"{compared} {text}" if text else compared


def _entry_quality(node: Node) -> str:
    if node.status is NodeStatus.DONE:
        return quality_word(_measured_r2(node))
    return str(node.status)


def format_entry(
    node: Node,
    proposal: Proposal | None,
    parent_node: Node | None,
    next_parent_id: int | None,
    analysis_text: str,
    config_keys: Sequence[str] = (),
    error: str | None = None,
) -> str:
    """The `analysis.md` entry of one finished node (protocol Step 3), ending in a newline.

    Numbers come only from `node.metrics` (the evaluator's); `config_keys` are the dotted keys
    shown on the Config line; `error` is the failure's message (its first line is shown);
    `analysis_text` is the interpretation from the proposal that follows this node."""
    parent = "root" if node.parent_id is None else str(node.parent_id)
    strategy = proposal.strategy if proposal is not None else node.strategy
    lines = [
        f"## Iter {node.id}: {_entry_quality(node)}",
        f"Node: id={node.id}, parent={parent}",
        f"Mode/Strategy: {one_line(str(strategy)) or '-'}",
        f"Config: {_config_line(node.config, config_keys)}",
    ]
    if proposal is not None and (proposal.code_change is not None or proposal.changes_code):
        change = proposal.code_change
        files = change.file if change else ", ".join(dict.fromkeys(e.file for e in proposal.edits))
        lines += ["CODE MODIFICATION:", f"  File: {one_line(files)}"]
        if change is not None and change.function:
            lines.append(f"  Function: {one_line(change.function)}")
        lines.append(f"  Change: {one_line(change.change) if change else '(not described)'}")
        if proposal.hypothesis:
            lines.append(f"  Hypothesis: {one_line(proposal.hypothesis)}")
    lines.append(f"Metrics: {_metrics_line(node, error)}")
    dataset = node.config.get("dataset")
    if isinstance(dataset, dict) and ("field" in dataset or "n_frames" in dataset):
        fields = []
        if "field" in dataset:
            fields.append(f"field_name={dataset['field']}")
        if "n_frames" in dataset:
            fields.append(f"n_frames={dataset['n_frames']}")
        lines.append(f"Field: {', '.join(fields)}")
    mutation = (proposal.mutation if proposal is not None else "") or node.mutation
    parent_rule = proposal.parent_rule if proposal is not None else ""
    lines += [
        f"Mutation: {one_line(mutation) or 'none'}",
        f"Parent rule: {one_line(parent_rule) or '-'}",
        f"Observation: {_observation(node, parent_node, analysis_text)}",
    ]
    if next_parent_id is not None:
        lines.append(f"Next: parent={next_parent_id}")
    return "\n".join(lines) + "\n"


# -- crash-safe append-only files -------------------------------------------------------------


@dataclass(frozen=True)
class _AppendRecord:
    """What the journal knows of an append-only file: where its last whole append ended."""

    end: int = 0
    recent: tuple[str, ...] = ()

    @classmethod
    def load(cls, raw: Any) -> _AppendRecord:
        # Anything unreadable counts as "nothing recorded": the repair then keeps a copy.
        try:
            return cls(int(raw.get("end", 0)), tuple(str(key) for key in raw.get("recent", ())))
        except (AttributeError, TypeError, ValueError):
            return cls()


class _AppendOnlyLog:
    """One append-only file whose recorded end lives in the state store under `state_key`."""

    def __init__(self, path: Path, store: StateStore, state_key: str):
        self.path = path
        self.store = store
        self.state_key = state_key

    def _record(self) -> _AppendRecord:
        return _AppendRecord.load(self.store.state(self.state_key))

    def _save(self, start: int, end: int, recent: Iterable[str]) -> None:
        recent = list(recent)[-RECENT_KEYS:]
        self.store.set_state(self.state_key, {"start": start, "end": end, "recent": recent})

    def contains(self, key: str) -> bool:
        return key in self._record().recent

    def append(self, key: str, text: str) -> bool:
        """Append `text` durably under `key`; False (nothing written) if `key` is already in."""
        record = self._record()
        if key in record.recent:
            return False
        payload = text.encode("utf-8")
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            start = os.fstat(fd).st_size
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_directory(self.path.parent)
        # Recorded only once the bytes are durable: a crash before this line is undone on open.
        self._save(start, start + len(payload), [*record.recent, key])
        return True

    def repair(self) -> str | None:
        """Cut the file back to its recorded end; the cut bytes go to `<file>.torn`.

        Returns what was done, in words, or None when the file was already consistent."""
        record = self._record()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size == record.end:
            return None
        if size < record.end:
            # Shortened from outside (edited by hand); the new length becomes the baseline.
            self._save(size, size, record.recent)
            return (
                f"{self.path.name} is shorter than proctor last wrote it "
                f"({size} < {record.end} bytes); continuing after its current end"
            )
        torn = self.path.with_name(self.path.name + TORN_SUFFIX)
        with open(self.path, "r+b") as source, open(torn, "ab") as keep:
            source.seek(record.end)
            while chunk := source.read(CHUNK):
                keep.write(chunk)
            keep.flush()
            os.fsync(keep.fileno())
            source.truncate(record.end)
            source.flush()
            os.fsync(source.fileno())
        return (
            f"{self.path.name}: removed {size - record.end} bytes after the last recorded "
            f"entry (an interrupted write), kept in {torn.name}"
        )


# -- the tail reader --------------------------------------------------------------------------


def _find_forward(handle: BinaryIO, start: int, size: int) -> int:
    """Offset of the first newline at or after `start`, or `size` when there is none."""
    position = start
    while position < size:
        handle.seek(position)
        chunk = handle.read(min(CHUNK, size - position))
        found = chunk.find(b"\n")
        if found >= 0:
            return position + found
        position += len(chunk)
    return size


def _line_start_before(handle: BinaryIO, end: int, floor: int) -> int:
    """Start of the line holding byte `end - 1` (no earlier than `floor`)."""
    position = end
    while position > floor:
        low = max(floor, position - CHUNK)
        handle.seek(low)
        found = handle.read(position - low).rfind(b"\n")
        if found >= 0:
            return low + found + 1
        position = low
    return floor


def _count_newlines(handle: BinaryIO, start: int, end: int) -> int:
    count, position = 0, start
    handle.seek(start)
    while position < end:
        chunk = handle.read(min(CHUNK, end - position))
        if not chunk:
            break
        count += chunk.count(b"\n")
        position += len(chunk)
    return count


def _decode(raw: bytes) -> str:
    return strip_control(raw.decode("utf-8", errors="replace"))


def log_tail(
    path: str | Path, max_bytes: int = 16_384, head_lines: int = 20, tail_lines: int = 60
) -> str:
    """The first `head_lines` and last `tail_lines` lines of a possibly huge log, within about
    `max_bytes` (a quarter for the head), with `… [N lines omitted] …` between them.

    Seeks instead of loading the file; over-long lines are cut with a `[N bytes cut]` mark;
    escape sequences and control characters other than newline and tab are removed. The
    result is untrusted text: the caller labels it so. A missing file gives ''."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed below, after several seeks
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise LogsError(f"cannot read the log {path}: {exc.strerror}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= max_bytes:
            lines = handle.read(size).decode("utf-8", errors="replace").splitlines()
            if len(lines) <= head_lines + tail_lines:
                return strip_control("\n".join(lines))
            omitted = len(lines) - head_lines - tail_lines
            head = [strip_control(line) for line in lines[:head_lines]]
            tail = [strip_control(line) for line in lines[len(lines) - tail_lines :]]
            return "\n".join([*head, f"… [{omitted} lines omitted] …", *tail])
        head_budget = max_bytes // 4 if head_lines else 0
        tail_budget = max_bytes - head_budget if tail_lines else 0
        head, head_end = _read_head(handle, size, head_budget, head_lines, size - tail_budget)
        tail, tail_start = _read_tail(handle, size, head_end, tail_budget, tail_lines)
        omitted = 0
        if tail_start > head_end:
            omitted = _count_newlines(handle, head_end, tail_start)
            # With no tail shown, a last line without a newline is omitted too.
            omitted += tail_start == size and _byte_at(handle, size - 1) != b"\n"
        middle = [f"… [{omitted} lines omitted] …"] if omitted else []
        return "\n".join(head + middle + tail)


def _read_head(
    handle: BinaryIO, size: int, budget: int, max_lines: int, tail_from: int
) -> tuple[list[str], int]:
    """Up to `max_lines` lines from the start within `budget` bytes, and where they end. A
    line reaching into the tail's window (from `tail_from`) is left to the tail: its end
    matters more than its start."""
    handle.seek(0)
    chunk = handle.read(budget)
    lines: list[str] = []
    position = 0
    while len(lines) < max_lines and position < len(chunk):
        newline = chunk.find(b"\n", position)
        if newline >= 0:
            lines.append(_decode(chunk[position:newline]))
            position = newline + 1
            continue
        # The line runs past the budget: show its beginning, skip to its real end.
        line_end = _find_forward(handle, len(chunk), size)
        if line_end > tail_from:
            break
        cut = line_end - len(chunk)
        lines.append(_decode(chunk[position:]) + (f"… [{cut} bytes cut]" if cut else ""))
        return lines, min(line_end + 1, size)
    return lines, position


def _read_tail(
    handle: BinaryIO, size: int, floor: int, budget: int, max_lines: int
) -> tuple[list[str], int]:
    """Up to `max_lines` lines before the end, not before `floor`, within `budget` bytes, and
    the offset where the first shown line starts."""
    if max_lines <= 0 or budget <= 0 or floor >= size:
        return [], size
    start = max(floor, size - budget)
    handle.seek(start)
    window = handle.read(size - start)
    first_is_partial = start > floor and _byte_at(handle, start - 1) != b"\n"
    if first_is_partial and window.startswith(b"\n") and len(window) > 1:
        # The window begins on a newline: the next line is whole, nothing to show of this one.
        start, window, first_is_partial = start + 1, window[1:], False
    body = window[:-1] if window.endswith(b"\n") else window
    pieces = body.split(b"\n")
    taken = pieces[-max_lines:]
    skipped = len(pieces) - len(taken)
    first_offset = start + sum(len(piece) + 1 for piece in pieces[:skipped])
    lines = [_decode(piece) for piece in taken]
    if first_is_partial and skipped == 0:
        # The window began inside a line: show its end, count it from its real start.
        line_start = _line_start_before(handle, start, floor)
        lines[0] = f"[{start - line_start} bytes cut] …" + lines[0]
        first_offset = line_start
    return lines, first_offset


def _byte_at(handle: BinaryIO, offset: int) -> bytes:
    handle.seek(offset)
    return handle.read(1)


# -- the run folder ---------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Non-finite floats as null: metrics.json stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


_BANNER = re.compile(r"^(=== Iteration \d+)", re.MULTILINE)


class RunLogs:
    """The files of one run folder, at the paths `paths` (a RunPaths) names. Pass the journal
    (or any StateStore) only in the engine that holds the run: the appends then become
    crash-safe and `repair_tails` runs on open, its messages in `repairs`. Without a store the
    object only reads and writes whole files."""

    def __init__(self, run_dir: str | Path, store: StateStore | None = None):
        self.paths = RunPaths(Path(run_dir))
        self.run_dir = self.paths.run_dir
        self._store = store
        self._analysis: _AppendOnlyLog | None = None
        self._reasoning: _AppendOnlyLog | None = None
        self.repairs: list[str] = []
        if store is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._analysis = _AppendOnlyLog(self.paths.analysis, store, ANALYSIS_END_KEY)
            self._reasoning = _AppendOnlyLog(self.paths.reasoning, store, REASONING_END_KEY)
            self.repairs = self.repair_tails()

    def _append_log(self, log: _AppendOnlyLog | None) -> _AppendOnlyLog:
        if log is None:
            raise LogsError("this RunLogs was opened without the journal: it cannot append")
        return log

    # -- append-only files -----------------------------------------------------------------

    def repair_tails(self) -> list[str]:
        """Cut analysis.md and reasoning.log back to their last recorded ends (what a SIGKILL
        mid-append leaves); returns a message per file that needed it."""
        logs = (self._append_log(self._analysis), self._append_log(self._reasoning))
        return [message for log in logs if (message := log.repair()) is not None]

    def append_analysis(self, entry: str, iteration: int) -> bool:
        """Append one `format_entry` text (plus a blank line), fsynced and recorded; False if
        this iteration's entry is already in the file (a resumed run re-recording it)."""
        text = entry if entry.endswith("\n") else entry + "\n"
        return self._append_log(self._analysis).append(str(iteration), text + "\n")

    def has_analysis(self, iteration: int) -> bool:
        return self._append_log(self._analysis).contains(str(iteration))

    def append_reasoning(self, iteration: int, text: str, *, attempt: int = 0) -> bool:
        """Append the agent's full text under `=== Iteration N ===` (attempt > 0: a repair's
        or a re-proposal's own banner); False if that attempt's text is already there."""
        banner = f"=== Iteration {iteration} ==="
        if attempt:
            banner = f"=== Iteration {iteration} (attempt {attempt}) ==="
        # A banner-like line inside the text is indented so it cannot pass for a real one.
        body = _BANNER.sub(r" \1", strip_control(text)).rstrip("\n")
        key = f"{iteration}/{attempt}"
        return self._append_log(self._reasoning).append(key, f"{banner}\n{body}\n\n")

    def format_entry(self, node: Node, *entry: Any, **options: Any) -> str:
        """`format_entry(node, ...)` for this run: a failed node's error, unless given, is the
        one its metrics.json recorded."""
        options.setdefault("error", self.recorded_error(node))
        return format_entry(node, *entry, **options)

    def recorded_error(self, node: Node) -> str | None:
        """The error in a failed node's metrics.json (None for a node that ran to the end)."""
        if node.status is NodeStatus.DONE:
            return None
        error = self.read_metrics(node.id).get("error")
        return error if isinstance(error, str) else None

    def read_analysis(self) -> str:
        return _read_text(self.paths.analysis)

    # -- memory.md -------------------------------------------------------------------------

    def init_memory(self, text: str | None = None) -> str | None:
        """Create memory.md (the protocol's skeleton, or `text`) unless it exists; returns a
        warning when the text is over the line cap."""
        if self.paths.memory.exists():
            return memory_warning(self.read_memory())
        return self.rewrite_memory(MEMORY_TEMPLATE if text is None else text)

    def rewrite_memory(self, text: str) -> str | None:
        """Replace memory.md atomically; returns a warning when over the line cap."""
        _write_whole(self.paths.memory, text if text.endswith("\n") else text + "\n")
        return memory_warning(text)

    def read_memory(self) -> str:
        """memory.md, or '' before it exists."""
        return _read_text(self.paths.memory)

    def add_do_not_retry(self, note: str) -> str | None:
        """Add `- note` under `### Do not retry` (idempotent); returns a cap warning or None."""
        current = self.read_memory() or MEMORY_TEMPLATE
        return self._update_memory(current, insert_do_not_retry(current, one_line(note)))

    def settle_iterations(self, nodes: Iterable[Node]) -> str | None:
        """The memory.md lines `- Node N (...) -> pending` of the finished ones among `nodes`
        show their outcome (the quality word, or failed/diverged); returns a cap warning or
        None. Every other line stays as written."""
        outcomes = {node.id: _entry_quality(node) for node in nodes
                    if node.status not in (NodeStatus.PENDING, NodeStatus.RUNNING)}
        current = self.read_memory()
        memory = Memory.parse(current)
        memory.settle_iterations(outcomes)
        return self._update_memory(current, memory.text())

    def _update_memory(self, current: str, updated: str) -> str | None:
        if updated != current:
            return self.rewrite_memory(updated)
        return memory_warning(current)

    # -- whole files -----------------------------------------------------------------------

    def write_scores(self, text: str) -> Path:
        """ucb_scores.txt (from `Tree.render_score_table`), atomically."""
        _write_whole(self.paths.scores, text, durable=False)
        return self.paths.scores

    def write_config_snapshot(self, iteration: int, config: dict[str, Any]) -> Path:
        """`configs/iter_NNN.yaml`: the full config of the run, the file the harness reads."""
        try:
            text = yaml.dump(config, Dumper=_YAML_DUMPER, sort_keys=False, allow_unicode=True)
        except yaml.YAMLError as exc:
            raise LogsError(
                f"the config of iteration {iteration} is not plain YAML: {exc}"
            ) from None
        path = self.paths.config_snapshot(iteration)
        _write_whole(path, text, durable=False)  # rewritten from the journal before each run
        return path

    def snapshot_protocol(self, block: int, text: str) -> Path:
        """`protocols/block_NNN.md`: the instruction file as the block starts (once)."""
        return _write_once(self.paths.protocol_snapshot(block), text)

    def snapshot_memory(self, block: int) -> Path:
        """`memory/block_NNN.md`: memory.md as the block ends (once)."""
        return _write_once(self.paths.memory_snapshot(block), self.read_memory())

    # -- per-node folders ------------------------------------------------------------------

    def write_metrics(
        self, node: Node, error: str | None = None, *, run: dict[str, Any] | None = None
    ) -> Path:
        """`metrics.json`: the node's final status, the evaluator's metrics, the error and
        (optionally) the runner's account of the process (`RunResult.to_dict()`)."""
        record: dict[str, Any] = {"node": node.id, "status": str(node.status)}
        record |= {"metrics": node.metrics, "error": error}
        if run is not None:
            record["run"] = run
        text = json.dumps(_json_safe(record), indent=2, allow_nan=False) + "\n"
        path = self.paths.metrics(node.id)
        _write_whole(path, text, durable=False)  # the journal holds the same result
        return path

    def read_metrics(self, node_id: int) -> dict[str, Any]:
        """A node's metrics.json as written, or {} when absent or unreadable."""
        try:
            record = json.loads(self.paths.metrics(node_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def write_change(self, node_id: int, diff_text: str, config_diff_text: str = "") -> list[Path]:
        """`change.diff` (the code edits' unified diff) and `config.diff` (the config
        changes), each only when non-empty; returns the files written."""
        written = []
        for path, text in (
            (self.paths.change_diff(node_id), diff_text),
            (self.paths.config_diff(node_id), config_diff_text),
        ):
            if text:
                # the journal holds the proposal these diffs are derived from
                _write_whole(path, text if text.endswith("\n") else text + "\n", durable=False)
                written.append(path)
        return written


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _write_whole(path: Path, text: str, *, durable: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text, durable=durable)


def _write_once(path: Path, text: str) -> Path:
    if not path.exists():
        _write_whole(path, text)
    return path
