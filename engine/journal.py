"""The crash-safe journal of one run: `log/<run>/journal.sqlite`.

SQLite in WAL mode with `synchronous=FULL`: every append is one durable transaction, so a
SIGKILL at any point leaves whole events only. The engine holds it open for writing (under a
single-instance `flock`); attached TUIs and `proctor approve/stop/...` open it as clients to
read events and post commands.

Re-appending a step that an iteration already has returns the stored event and changes
nothing: after a crash the loop re-runs its current step and simply gets the first answer.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from engine.paths import RunPaths

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0


class JournalError(Exception):
    """A journal that cannot be used as asked; the message is meant for the user."""


class RunLockedError(JournalError):
    """Another engine process is driving this run."""


class JournalLost(JournalError):
    """The journal file the engine writes is no longer the one at its path."""


class Step(StrEnum):
    """The steps of one iteration, in the order they happen (some may be skipped)."""

    STARTED = "started"
    PROPOSAL_STORED = "proposal_stored"
    REVIEW = "review"  # the prepared proposal: diffs, awaiting a human or refused and why
    DECISION = "decision"
    APPLIED = "applied"
    RUN_STARTED = "run_started"
    RUN_FINISHED = "run_finished"
    RECORDED = "recorded"


class RunEvent(StrEnum):
    """Events of the run as a whole (no iteration)."""

    RUN_CREATED = "run_created"
    PAUSED = "paused"
    RESUMED = "resumed"
    STOPPED = "stopped"
    AGENT_EXCHANGE = "agent_exchange"
    AB_RUN = "ab_run"  # one arm of one seed of an A/B test ended (engine.ab_runs)
    AB_RESULT = "ab_result"  # an A/B test's comparison, with its node


_STEP_ORDER = {step.value: index for index, step in enumerate(Step)}


@dataclass(frozen=True)
class Event:
    """One journal row as read back."""

    seq: int
    iteration: int | None
    attempt: int
    step: str
    payload: dict[str, Any]
    created_at: float


@dataclass(frozen=True)
class Command:
    """A request from another process (approve, reject, stop, pause, ...)."""

    id: int
    kind: str
    payload: dict[str, Any]
    created_at: float


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    iteration INTEGER,
    attempt INTEGER NOT NULL DEFAULT 0,
    step TEXT NOT NULL,
    key TEXT UNIQUE,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX events_by_iteration ON events (iteration, seq);
CREATE INDEX events_by_step ON events (step, iteration);
CREATE TABLE commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    consumed_at REAL
);
CREATE INDEX commands_open ON commands (consumed_at, id);
CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL);
"""

# Migrations from version N to N+1, run in order inside one transaction on open.
_MIGRATIONS: dict[int, str] = {}


def _encode(payload: Any) -> str:
    """Pydantic models, dataclasses and JSON-able dicts to JSON text (NaN allowed)."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    elif dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        payload = dataclasses.asdict(payload)
    elif payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise JournalError(f"a journal payload must be a mapping, got {type(payload).__name__}")
    try:
        return json.dumps(payload, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise JournalError(f"a journal payload is not JSON-able: {exc}") from None


def _as_step(step: Step | str) -> str:
    try:
        return Step(step).value
    except ValueError:
        raise JournalError(f"unknown iteration step '{step}'") from None


def _as_run_event(kind: RunEvent | str) -> str:
    try:
        return RunEvent(kind).value
    except ValueError:
        raise JournalError(f"unknown run event '{kind}'") from None


def _step_key(iteration: int, attempt: int, step: str) -> str:
    return f"iter/{iteration}/{attempt}/{step}"


def _event(row: tuple[Any, ...]) -> Event:
    seq, iteration, attempt, step, payload, created_at = row
    return Event(seq, iteration, attempt, step, json.loads(payload), created_at)


_EVENT_COLUMNS = "seq, iteration, attempt, step, payload, created_at"


class Journal:
    """One run's journal. Open with `open_for_engine` (locks) or `open_for_client`."""

    def __init__(self, path: Path, connection: sqlite3.Connection, lock_fd: int | None):
        self.path = path
        self._db = connection
        self._lock_fd = lock_fd
        self._identity = _file_identity(path)
        # One connection, possibly reached from a UI thread and the engine thread.
        self._mutex = threading.RLock()

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open_for_engine(cls, run_dir: str | Path) -> Journal:
        """Take the run's single-instance lock, then open (or create) its journal.

        Raises RunLockedError, having modified nothing, when another engine holds the run."""
        run_dir = Path(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(RunPaths(run_dir).lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise JournalError(f"cannot open the run folder {run_dir}: {exc}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock_owner(lock_fd)
            os.close(lock_fd)
            raise RunLockedError(
                f"run '{run_dir.name}' is already driven by another proctor engine "
                f"({holder}); attach to it instead, or stop that process first"
            ) from None
        try:
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()}
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, (json.dumps(owner) + "\n").encode(), 0)
            connection = _connect(RunPaths(run_dir).journal, create=True)
        except BaseException:
            os.close(lock_fd)  # closing the descriptor drops the flock
            raise
        return cls(RunPaths(run_dir).journal, connection, lock_fd)

    @classmethod
    def open_for_client(cls, run_dir: str | Path) -> Journal:
        """Open an existing run's journal to read it and post commands; takes no lock."""
        path = RunPaths(Path(run_dir)).journal
        if not path.is_file():
            raise JournalError(f"no journal at {path}: is '{Path(run_dir).name}' a proctor run?")
        # a teammate who may read the run but not write it still gets to watch it
        writable = os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
        return cls(path, _connect(path, create=False, read_only=not writable), None)

    def close(self) -> None:
        """Close the database and release the engine lock (if held)."""
        with self._mutex:
            self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def check_in_place(self) -> None:
        """Raise JournalLost when the file at the journal's path is gone or another file
        than the one open here: steps written to it now would reach nobody."""
        if self._lock_fd is None:
            return  # a client reads whatever is there
        if _file_identity(self.path) != self._identity:
            raise JournalLost(
                f"the journal {self.path} was deleted or replaced while the run was going; "
                "the engine stopped rather than record steps that nobody could read. Restore "
                "the file from a backup to resume this run, or start a new run")

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One durable write transaction (IMMEDIATE: check-then-insert stays atomic)."""
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._mutex:
            return self._db.execute(sql, params).fetchall()

    # -- iteration steps -------------------------------------------------------------------

    def append(
        self, iteration: int, step: Step | str, payload: Any = None, *, attempt: int = 0
    ) -> Event:
        """Record a step of an iteration (attempt > 0: a repair attempt).

        Idempotent: if this (iteration, attempt, step) is already there, the stored event is
        returned and the new payload ignored. A step earlier than one already recorded for the
        same attempt is a JournalError (the loop went backwards)."""
        step = _as_step(step)
        if iteration < 1 or attempt < 0:
            raise JournalError(f"bad iteration/attempt: {iteration}/{attempt}")
        self.check_in_place()
        key = _step_key(iteration, attempt, step)
        text = _encode(payload)
        with self._write() as db:
            row = db.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE key = ?", (key,)
            ).fetchone()
            if row is not None:
                return _event(row)
            last = db.execute(
                "SELECT step FROM events WHERE iteration = ? AND attempt = ?"
                " AND step != 'agent_exchange'"
                " ORDER BY seq DESC LIMIT 1",
                (iteration, attempt),
            ).fetchone()
            if last is not None and _STEP_ORDER[last[0]] > _STEP_ORDER[step]:
                raise JournalError(
                    f"iteration {iteration} (attempt {attempt}) is already at '{last[0]}'; "
                    f"cannot record '{step}' after it"
                )
            event = self._insert(db, iteration, attempt, step, key, text)
        _crash_if_asked(iteration, step)
        return event

    def _insert(
        self,
        db: sqlite3.Connection,
        iteration: int | None,
        attempt: int,
        step: str,
        key: str | None,
        text: str,
    ) -> Event:
        now = time.time()
        cursor = db.execute(
            "INSERT INTO events (iteration, attempt, step, key, payload, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (iteration, attempt, step, key, text, now),
        )
        return Event(cursor.lastrowid or 0, iteration, attempt, step, json.loads(text), now)

    def last_step(self, iteration: int) -> Event | None:
        """The latest step event of an iteration (any attempt), or None if it never started."""
        rows = self._query(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE iteration = ? AND step != 'agent_exchange'"
            " ORDER BY seq DESC LIMIT 1",
            (iteration,),
        )
        return _event(rows[0]) if rows else None

    def payload(self, iteration: int, step: Step | str, attempt: int | None = None) -> dict | None:
        """The stored payload of a step (default: its latest attempt), or None."""
        step = _as_step(step)
        if attempt is not None:
            rows = self._query(
                "SELECT payload FROM events WHERE key = ?", (_step_key(iteration, attempt, step),)
            )
        else:
            rows = self._query(
                "SELECT payload FROM events WHERE iteration = ? AND step = ?"
                " ORDER BY attempt DESC LIMIT 1",
                (iteration, step),
            )
        return json.loads(rows[0][0]) if rows else None

    def unfinished_iterations(self) -> list[int]:
        """Iterations started but not recorded, oldest first."""
        rows = self._query(
            "SELECT DISTINCT iteration FROM events WHERE step = 'started' AND iteration NOT IN"
            " (SELECT iteration FROM events WHERE step = 'recorded') ORDER BY iteration"
        )
        return [row[0] for row in rows]

    def unfinished_iteration(self) -> int | None:
        """The oldest iteration that started but was not recorded (what a resume re-enters)."""
        unfinished = self.unfinished_iterations()
        return unfinished[0] if unfinished else None

    def completed_iterations(self) -> list[int]:
        rows = self._query(
            "SELECT DISTINCT iteration FROM events WHERE step = 'recorded' ORDER BY iteration"
        )
        return [row[0] for row in rows]

    def next_iteration(self) -> int:
        """One past the highest iteration ever started (unfinished ones are not reused)."""
        rows = self._query("SELECT MAX(iteration) FROM events WHERE step = 'started'")
        return (rows[0][0] or 0) + 1

    def events(self, iteration: int | None = None, *, after_seq: int = 0) -> list[Event]:
        """Events in order; one iteration's only when given; `after_seq` for tailing."""
        if iteration is None:
            rows = self._query(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq", (after_seq,)
            )
        else:
            rows = self._query(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE iteration = ? AND seq > ? ORDER BY seq",
                (iteration, after_seq),
            )
        return [_event(row) for row in rows]

    # -- run-level events ------------------------------------------------------------------

    def append_run_event(self, kind: RunEvent | str, payload: Any = None) -> Event:
        """Record paused/resumed/stopped (repeatable) or run_created (once: idempotent)."""
        kind = _as_run_event(kind)
        if kind == RunEvent.AGENT_EXCHANGE:
            raise JournalError("agent exchanges go through store_exchange(key, ...)")
        key = kind if kind == RunEvent.RUN_CREATED else None
        text = _encode(payload)
        with self._write() as db:
            if key is not None:
                row = db.execute(
                    f"SELECT {_EVENT_COLUMNS} FROM events WHERE key = ?", (key,)
                ).fetchone()
                if row is not None:
                    return _event(row)
            return self._insert(db, None, 0, kind, key, text)

    def run_events(self, kind: RunEvent | str | None = None) -> list[Event]:
        """Run-level events in order (all kinds, or one)."""
        if kind is None:
            sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE iteration IS NULL ORDER BY seq"
            return [_event(row) for row in self._query(sql)]
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE step = ? ORDER BY seq"
        return [_event(row) for row in self._query(sql, (_as_run_event(kind),))]

    def store_exchange(self, key: str, payload: Any, *, iteration: int | None = None) -> Event:
        """Keep a raw agent request/response under a caller-chosen key (first one wins), so a
        resumed run reuses an answer it already paid for."""
        text = _encode(payload)
        with self._write() as db:
            row = db.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE key = ?", (f"agent/{key}",)
            ).fetchone()
            if row is not None:
                return _event(row)
            return self._insert(db, iteration, 0, RunEvent.AGENT_EXCHANGE, f"agent/{key}", text)

    def exchange(self, key: str) -> dict | None:
        """A stored agent exchange, or None."""
        rows = self._query("SELECT payload FROM events WHERE key = ?", (f"agent/{key}",))
        return json.loads(rows[0][0]) if rows else None

    # -- commands from other processes -----------------------------------------------------

    def post_command(self, kind: str, payload: Any = None) -> int:
        """Queue a command for the engine (from any process); returns its id."""
        text = _encode(payload)
        try:
            with self._write() as db:
                cursor = db.execute(
                    "INSERT INTO commands (kind, payload, created_at) VALUES (?, ?, ?)",
                    (kind, text, time.time()),
                )
                return cursor.lastrowid or 0
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc):
                raise
            raise JournalError(f"cannot send {kind} to the run: you may read {self.path} but "
                               "not write it (ask its owner, or run as them)") from None

    def take_commands(self) -> list[Command]:
        """The engine's side: every unconsumed command, oldest first, marked consumed atomically."""
        # A plain read first: polling an empty queue must not cost a durable commit.
        if not self._query("SELECT 1 FROM commands WHERE consumed_at IS NULL LIMIT 1"):
            return []
        with self._write() as db:
            rows = db.execute(
                "UPDATE commands SET consumed_at = ? WHERE consumed_at IS NULL"
                " RETURNING id, kind, payload, created_at",
                (time.time(),),
            ).fetchall()
        commands = [Command(row[0], row[1], json.loads(row[2]), row[3]) for row in rows]
        commands.sort(key=lambda command: command.id)
        return commands

    def command_consumed(self, command_id: int) -> bool:
        """Whether the engine has taken a posted command (for a client waiting on it)."""
        rows = self._query("SELECT consumed_at FROM commands WHERE id = ?", (command_id,))
        return bool(rows) and rows[0][0] is not None

    # -- durable flags ---------------------------------------------------------------------

    def set_state(self, key: str, value: Any) -> None:
        """Set a durable flag (any JSON value; None deletes it)."""
        with self._write() as db:
            if value is None:
                db.execute("DELETE FROM state WHERE key = ?", (key,))
                return
            try:
                text = json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise JournalError(f"state '{key}' is not JSON-able: {exc}") from None
            db.execute(
                "INSERT INTO state (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (key, text, time.time()),
            )

    def state(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM state WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default


# Fault injection for the resume tests: "ITERATION:STEP" makes the engine SIGKILL itself right
# after that step is durable, the way a power cut or the OOM killer would.
CRASH_AFTER_ENV = "PROCTOR_CRASH_AFTER"


def _crash_if_asked(iteration: int, step: str) -> None:
    target = os.environ.get(CRASH_AFTER_ENV)
    if target and target == f"{iteration}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _read_lock_owner(lock_fd: int) -> str:
    """Who holds the lock, in words (the holder wrote its pid there)."""
    try:
        owner = json.loads(os.pread(lock_fd, 4096, 0).decode() or "{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started_at"]))
        return f"pid {owner['pid']} on {owner['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def _connect(path: Path, *, create: bool, read_only: bool = False) -> sqlite3.Connection:
    """Open the database durable and shareable, creating or migrating its schema; a
    `read_only` connection only reads (it changes neither the mode nor the schema)."""
    mode = "ro" if read_only else "rwc" if create else "rw"
    if read_only and not Path(f"{path}-shm").exists():
        mode += "&immutable=1"  # no engine has it open: nothing can change while we read
    try:
        db = sqlite3.connect(
            f"file:{path}?mode={mode}",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # guarded by Journal._mutex
        )
    except sqlite3.Error as exc:
        raise JournalError(f"cannot open the journal {path}: {exc}") from None
    try:
        if read_only:
            version = _schema_version(db)
            if version is None or version > SCHEMA_VERSION:
                raise JournalError(f"the journal {path} is not one this proctor can read")
            return db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        _ensure_schema(db, path, create=create)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise JournalError(f"the journal {path} cannot be used: {exc}") from None
    except JournalError:
        db.close()
        raise
    return db


def _ensure_schema(db: sqlite3.Connection, path: Path, *, create: bool) -> None:
    """Create the schema in a new journal, or migrate an older one; reads only otherwise."""
    version = _schema_version(db)
    if version == SCHEMA_VERSION:
        return
    if version is None and not create:
        raise JournalError(f"the journal {path} is not initialised (yet)")
    if version is not None and version > SCHEMA_VERSION:
        raise JournalError(
            f"the journal {path} has schema version {version}, newer than this proctor "
            f"understands ({SCHEMA_VERSION}); upgrade proctor to open it"
        )
    db.execute("BEGIN IMMEDIATE")
    try:
        version = _schema_version(db)  # again, under the write lock
        if version is None:
            _run_script(db, _SCHEMA)
            db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", ("0",))
            version = SCHEMA_VERSION
        while version < SCHEMA_VERSION:
            if version not in _MIGRATIONS:
                raise JournalError(f"the journal {path}: no migration from version {version}")
            _run_script(db, _MIGRATIONS[version])
            version += 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _schema_version(db: sqlite3.Connection) -> int | None:
    """The stored schema version; None for a database without our tables."""
    has_meta = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not has_meta:
        return None
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT the open transaction; run statement by statement instead.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)
