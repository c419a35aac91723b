"""Seeing a run that another process drives: its journal and files as typed engine events.

`AttachedRun.poll()` reads the journal rows written since the last poll and the new bytes of
the training log of every run in flight (one per slot), and returns the SAME `engine.events`
values the in-process engine publishes, so a viewer (the TUI) has one code path for both.
Decisions go back as journal commands (`send`). `RunReader` is the read-only view of a run
folder both kinds of viewer use for the tree, the code at any node and the agent's cost so
far.

Nothing here takes the run lock or writes anything but commands: any number of viewers may
attach to one run, and quitting them leaves it going."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import events as ev
from engine.config import ExperimentConfig
from engine.human import MANUAL_EDIT, REVERT
from engine.journal import Event, Journal, JournalError, RunEvent, Step
from engine.logs import RunLogs, strip_control
from engine.paths import RunPaths
from engine.progress import latest_progress
from engine.proposal import Proposal
from engine.review import Review
from engine.runner.types import RunResult
from engine.state import RunState
from engine.tree import Node, NodeStatus, Tree, TreeError, status_after_run
from engine.watch import ManualEdit
from engine.workspace import CodeStore

# Per poll, at most this many new log lines reach the viewer (the file keeps them all).
MAX_LINES_PER_POLL = 2000
# A log tail starts this far from the end of the file: a viewer never reads a whole big log.
TAIL_START_BYTES = 256 * 1024
# Bytes read from a log per poll; a faster writer is skipped ahead (the marker says so).
MAX_READ_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RunPlace:
    """Where a run executes, as its `run_started` step journaled it: the slot, the place in
    words ("local slot 2 on GPU 1", "dask worker tcp://10.1.2.3:40211") and the local
    step's pid (0 for a run on a Dask worker)."""

    slot: int
    where: str
    pid: int

    @classmethod
    def of(cls, payload: dict[str, Any]) -> RunPlace:
        """From a `run_started` payload; an engine before slots journaled only the process
        identity of the run (pid, pgid, ...): slot 1, on this machine."""
        pid = int(payload.get("pid") or 0)
        if "slot" not in payload:
            return cls(1, "local slot 1", pid)
        slot = int(payload["slot"])
        return cls(slot, str(payload.get("where") or f"slot {slot}"), pid)


def slot_names(config: ExperimentConfig) -> tuple[str, ...]:
    """Where each slot of a run with `config` runs, slot 1 first, for a run no engine with
    slots has opened yet (an engine journals its own words: `RunState.slots`)."""
    exploration = config.exploration
    dask = exploration.executor.dask
    if exploration.executor.kind == "local":
        return tuple(f"local slot {slot}" for slot in range(1, exploration.parallel + 1))
    place = dask.scheduler or (f"{dask.cluster.system} cluster" if dask.cluster else "dask")
    return tuple(f"dask slot {slot} ({place})" for slot in range(1, exploration.parallel + 1))

@dataclass(frozen=True)
class RunInfo:
    """What a run was created with (its `run_created` journal record)."""

    name: str
    run_dir: Path
    project_root: Path
    config: ExperimentConfig
    iterations: int
    approval: str
    agent: str
    created_at: float

    @property
    def instructions_path(self) -> Path:
        return self.project_root / self.config.exploration.instructions


class RunReader:
    """A read-only view of one run folder: its tree (from the journal), node code and files.

    `refresh()` folds the journal rows written since the last call; a lock makes it safe to
    call from a worker thread while another thread reads `snapshot()`."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.journal = Journal.open_for_client(self.run_dir)
        try:
            created = self.journal.run_events(RunEvent.RUN_CREATED)
            if not created:
                raise JournalError(f"run '{self.run_dir.name}' has no creation record (yet)")
            record = created[0].payload
            config = ExperimentConfig.model_validate(record["config"])
            settings = record["settings"]
            self.info = RunInfo(
                name=settings["name"], run_dir=self.run_dir,
                project_root=Path(record["project_root"]), config=config,
                iterations=int(settings["iterations"]), approval=settings["approval"],
                agent=settings["agent"], created_at=created[0].created_at,
            )
        except (KeyError, TypeError, ValueError) as exc:
            self.journal.close()
            raise JournalError(f"run '{self.run_dir.name}' has an unreadable record: {exc}") \
                from None
        except BaseException:
            self.journal.close()
            raise
        exploration = config.exploration
        self.tree = Tree(block_size=exploration.block_size, score=exploration.score,
                         c=exploration.ucb_c)
        self.logs = RunLogs(self.run_dir)
        self.paths = RunPaths(self.run_dir)
        # Built from the run folder's vcs.yaml on first use (an attached reader has no engine).
        self.code = CodeStore(self.run_dir, exploration.harness.split(".")[0],
                              exploration.editable_files)
        self.cost_usd = 0.0
        self.iteration_times: dict[int, tuple[float, float | None]] = {}
        self.unfinished_slots: dict[int, int] = {}  # iteration -> the slot it started in
        self.stopped: str | None = None
        self._seq = 0
        self.lock = threading.RLock()  # hold it to read `tree` from another thread

    def close(self) -> None:
        self.journal.close()

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- folding the journal ---------------------------------------------------------------

    def new_rows(self) -> list[Event]:
        """Journal rows written since the last call (not folded yet)."""
        with self.lock:
            rows = self.journal.events(after_seq=self._seq)
            if rows:
                self._seq = rows[-1].seq
            return rows

    def fold(self, row: Event) -> None:
        """Update the tree and the run's counters with one journal row (a row this version
        cannot read is skipped: a viewer must keep going)."""
        with self.lock, contextlib.suppress(TreeError, KeyError, TypeError, ValueError):
            self._fold(row)

    def refresh(self) -> int:
        """Fold every new journal row; returns how many there were."""
        with self.lock:
            rows = self.new_rows()
            for row in rows:
                self.fold(row)
            return len(rows)

    def _fold(self, row: Event) -> None:
        payload = row.payload
        if row.iteration is None:
            if row.step == RunEvent.STOPPED:
                self.stopped = str(payload.get("reason", "stopped"))
            elif row.step == RunEvent.RUN_CREATED:
                self.stopped = None
            return
        iteration = row.iteration
        if row.step == Step.STARTED:
            self.stopped = None
            self.iteration_times.setdefault(iteration, (row.created_at, None))
            self.unfinished_slots[iteration] = int(payload.get("slot", 1))
        elif row.step == Step.PROPOSAL_STORED:
            cost = payload.get("cost_usd")
            if isinstance(cost, int | float) and math.isfinite(cost):
                self.cost_usd += float(cost)
        elif row.step in (Step.APPLIED, Step.RECORDED) and payload.get("node"):
            self._put_node(Node.from_dict(payload["node"]))
        elif row.step == Step.RUN_STARTED and iteration in self.tree:
            self.tree.update(iteration, status=NodeStatus.RUNNING)
        elif row.step == Step.RUN_FINISHED and iteration in self.tree:
            result = RunResult.from_dict(payload["result"])
            self.tree.update(iteration, status=status_after_run(result.status),
                             metrics=dict(result.metrics))
        if row.step == Step.RECORDED:
            self.unfinished_slots.pop(iteration, None)
            started = self.iteration_times.get(iteration, (row.created_at, None))[0]
            self.iteration_times[iteration] = (started, row.created_at)

    def _put_node(self, node: Node) -> None:
        if node.id in self.tree:
            current = self.tree.get(node.id)
            current.status, current.metrics = node.status, dict(node.metrics)
            current.commit = node.commit or current.commit
            return
        # A node whose parent this viewer never saw (or that failed) is left out.
        with contextlib.suppress(TreeError):
            self.tree.add(node)

    # -- questions about the run -----------------------------------------------------------

    def node(self, node_id: int) -> Node | None:
        with self.lock:
            return self.tree.get(node_id) if node_id in self.tree else None

    def best(self) -> tuple[int | None, float | None]:
        """The best done node and its final R2 (None, None before any)."""
        with self.lock:
            best = self.tree.best_node()
        return (best.id, best.metrics.get("final_r2")) if best else (None, None)

    def files_at(self, node_id: int | None) -> dict[str, str]:
        """The editable files as they are at a node (None: the run's base code)."""
        with self.lock:
            commit = self.tree.commit_of(node_id, self.code.lineage.base)
        return self.code.files_at_commit(commit)

    def engine_running(self) -> bool:
        """Whether an engine process holds this run (judged from its lock file's owner)."""
        try:
            owner = json.loads(self.paths.lock.read_text() or "{}")
            pid = int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if owner.get("host") not in (None, socket.gethostname()):
            return True  # another machine's process: trust the journal
        held = _flock_held(self.paths.lock)
        if held is not None:
            return held  # the lock itself, not a pid that may have been reused
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _flock_held(path: Path) -> bool | None:
    """Whether some process holds a flock on `path`, from /proc/locks (None: cannot tell)."""
    try:
        stat = os.stat(path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    return any(fields[1] == "FLOCK" and fields[5] == device
               for fields in (line.split() for line in table.splitlines()) if len(fields) > 5)


class _LogTail:
    """New lines of a growing training log, read without loading the file."""

    def __init__(self, path: Path, iteration: int):
        self.path = path
        self.iteration = iteration
        self._offset: int | None = None  # None: start near the end on the first read
        self._partial = b""

    def read(self, max_lines: int = MAX_LINES_PER_POLL, final: bool = False) -> list[str]:
        """Lines completed since the last read (the last partial line too when `final`);
        over `max_lines`, the oldest are replaced by one marker line."""
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 - closed below
        except OSError:
            return []
        skipped_bytes = 0
        with handle:
            size = os.fstat(handle.fileno()).st_size
            if self._offset is None or size < self._offset:  # first read, or rewritten
                start = max(0, size - TAIL_START_BYTES)
                self._partial = b""
                if start:
                    handle.seek(start - 1)
                    if handle.read(1) != b"\n":
                        handle.readline()  # skip to the first whole line
                    start = handle.tell()
                self._offset = start
            if size - self._offset > MAX_READ_BYTES:
                skipped_bytes = size - MAX_READ_BYTES - self._offset
                self._offset = size - MAX_READ_BYTES
                self._partial = b""
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        self._offset += len(data)
        data = self._partial + data
        pieces = data.split(b"\n")
        self._partial = b"" if final else pieces.pop()
        if final and pieces and pieces[-1] == b"":
            pieces.pop()
        lines = [strip_control(piece.decode("utf-8", "replace").rstrip("\r"))
                 for piece in pieces]
        dropped = max(0, len(lines) - max_lines)
        if dropped or skipped_bytes:
            lines = lines[dropped:]
            what = f"{dropped} lines" + (f" and {skipped_bytes} bytes" if skipped_bytes else "")
            lines.insert(0, f"[proctor] {what} not shown here (all are in {self.path.name})")
        return lines


class AttachedRun:
    """A run driven by another process, followed through its journal and log files."""

    def __init__(self, run_dir: str | Path, *, max_lines_per_poll: int = MAX_LINES_PER_POLL):
        self.reader = RunReader(run_dir)
        self.info = self.reader.info
        self.max_lines = max_lines_per_poll
        self._opened = False
        self._tails: dict[int, _LogTail] = {}  # iteration -> its run's log, while it runs
        self._best: float | None = None
        self._engine_gone_reported = False
        self._human: dict[int, dict[str, Any]] = {}  # iteration -> the human change it runs
        self._proposals: dict[tuple[int, int], Proposal] = {}  # awaiting their review row
        self._review_ids: dict[tuple[int, int], str] = {}
        self._manual: dict[str, ManualEdit] = {}  # the manual edits reported as pending
        self._stale: set[tuple[Any, str]] = set()

    def close(self) -> None:
        self.reader.close()

    # -- commands --------------------------------------------------------------------------

    def send(self, command: ev.Command) -> int:
        """Post a command for the engine to the journal; returns its id."""
        payload = command.to_payload()
        kind = payload.pop("kind")
        return self.reader.journal.post_command(kind, payload)

    # -- events ----------------------------------------------------------------------------

    def poll(self) -> list[ev.Event]:
        """The events that happened since the last poll (all of the run's history first)."""
        events: list[ev.Event] = []
        if not self._opened:
            self._opened = True
            state = RunState(self.reader.journal)
            events.append(ev.RunOpened(self.info.name, str(self.info.run_dir),
                                       self.info.iterations, sandbox_missing=state.sandbox_missing,
                                       slots=state.slots or slot_names(self.info.config)))
        rows = self.reader.new_rows()
        finished = {(r.iteration, r.attempt) for r in rows if r.step == Step.RUN_FINISHED}
        last_start: dict[int, int] = {}  # slot -> the latest run start of this batch there
        for row in rows:
            if row.step == Step.RUN_STARTED:
                with contextlib.suppress(TypeError, ValueError):
                    last_start[RunPlace.of(row.payload).slot] = row.seq
        for row in rows:
            self.reader.fold(row)
            try:
                events.extend(self._translate(row, finished, last_start))
            except (KeyError, TypeError, ValueError) as exc:  # a viewer keeps going
                events.append(ev.EngineError(f"skipped a journal record this viewer cannot "
                                             f"read ({row.step} #{row.seq}: {exc})"))
        for tail in list(self._tails.values()):
            events.extend(self._log_events(tail, tail.read(self.max_lines)))
        events.extend(self._manual_edit_events())
        events.extend(self._engine_state())
        return events

    def follow(self, publish: Callable[[ev.Event], None], stop: threading.Event,
               interval_s: float = 0.25) -> None:
        """Publish events until `stop` is set (blocking: run it in a thread)."""
        while not stop.is_set():
            for event in self.poll():
                publish(event)
            stop.wait(interval_s)

    def _translate(self, row: Event, finished: set, last_start: dict[int, int]
                   ) -> list[ev.Event]:
        payload, iteration = row.payload, row.iteration
        if iteration is None:
            return self._run_event(row)
        key = (iteration, row.attempt)
        match row.step:
            case Step.STARTED:
                return [ev.IterationStarted(iteration, int(payload.get("block", 0)),
                                            self.info.iterations, int(payload.get("slot", 1)))]
            case Step.PROPOSAL_STORED:
                self._proposals[key] = Proposal.model_validate(payload["proposal"])
                if payload.get("human"):
                    self._human[iteration] = payload["human"]
                return []
            case Step.REVIEW:
                return self._review(Review.from_dict(payload))
            case Step.APPLIED:
                return self._applied(iteration, payload)
            case Step.DECISION:
                return [ev.ProposalDecided(iteration, bool(payload.get("approved")),
                                           str(payload.get("reason", "")),
                                           str(payload.get("by", "policy")),
                                           self._review_ids.get(key, ""))]
            case Step.RUN_STARTED:
                node = self.reader.node(iteration)
                place = RunPlace.of(payload)
                started = ev.TrainingStarted(
                    iteration, iteration, node.parent_id if node else None,
                    node.mutation if node else "", place.pid, place.slot, place.where)
                # History already finished is not tailed, except each slot's latest run's log.
                if key not in finished or row.seq == last_start.get(place.slot):
                    self._tails[iteration] = _LogTail(
                        self.reader.paths.training_log(iteration), iteration)
                return [started]
            case Step.RUN_FINISHED:
                events: list[ev.Event] = []
                tail = self._tails.pop(iteration, None)
                if tail is not None:
                    events.extend(self._log_events(tail, tail.read(self.max_lines, final=True)))
                result = RunResult.from_dict(payload["result"])
                status = status_after_run(result.status)
                r2 = result.metrics.get("final_r2")
                if status is NodeStatus.DONE and isinstance(r2, float) and math.isfinite(r2):
                    self._best = r2 if self._best is None else max(self._best, r2)
                events.append(ev.NodeFinished(iteration, iteration, str(status),
                                              dict(result.metrics), result.error, self._best))
                return events
            case Step.RECORDED if payload.get("node") is None:
                return [ev.IterationSkipped(iteration, str(payload.get("skipped", "skipped")))]
        return []

    def _review(self, review: Review) -> list[ev.Event]:
        """The engine's journaled review as the events the engine published with it."""
        key = (review.iteration, review.attempt)
        proposal = self._proposals.pop(key, None)
        self._review_ids[key] = review.proposal_id
        if review.refused is not None:
            return [ev.ProposalInvalid(review.iteration, review.refused, review.attempt + 1)]
        if proposal is None:
            return []
        return [ev.ProposalReady(review.iteration, proposal, review.diff, review.config_diff,
                                 review.awaiting, review.proposal_id)]

    def _applied(self, iteration: int, payload: dict[str, Any]) -> list[ev.Event]:
        try:
            node = Node.from_dict(payload["node"])
        except (KeyError, TreeError):
            return []
        events: list[ev.Event] = []
        if node.code_changed and node.commit:
            events.append(ev.CodeCommitted(iteration, node.commit))
        human = self._human.pop(iteration, {})
        if human.get("kind") == REVERT:
            events.append(ev.NodeReverted(iteration, int(human.get("reverted_id") or 0),
                                          node.commit))
        return events

    def _manual_edit_events(self) -> list[ev.Event]:
        """Manual edits and stale proposals, from the state the engine keeps in the journal."""
        journal = self.reader.journal
        pending: dict[str, ManualEdit] = {}
        for item in RunState(journal).manual_edits:
            with contextlib.suppress(KeyError, TypeError):
                edit = ManualEdit.from_dict(item)
                pending[edit.path] = edit
        events: list[ev.Event] = []
        for path, edit in pending.items():
            if self._manual.get(path) != edit:
                events.append(ev.ManualEditDetected(path, edit.diff, edit.where))
        gone = [path for path in self._manual if path not in pending]
        if gone:
            queued = RunState(journal).human_queue
            adopted = {path for item in [*queued, *self._human.values()]
                       if item.get("kind") == MANUAL_EDIT for path in item.get("files", {})}
            events.extend(ev.ManualEditResolved(path, adopted=path in adopted) for path in gone)
        self._manual = pending
        stale = RunState(journal).stale_proposal or {}
        for path in stale.get("paths", []):
            key = (stale.get("iteration"), path)
            if key not in self._stale:
                self._stale.add(key)
                events.append(ev.ProposalStale(int(stale.get("iteration") or 0), path))
        return events

    def _run_event(self, row: Event) -> list[ev.Event]:
        match row.step:
            case RunEvent.PAUSED:
                return [ev.Paused(str(row.payload.get("reason", "paused")))]
            case RunEvent.RESUMED:
                return [ev.Resumed()]
            case RunEvent.STOPPED:
                best_id, best_r2 = self.reader.best()
                return [ev.RunFinished(str(row.payload.get("reason", "stopped")), best_id,
                                       best_r2)]
        return []

    def _log_events(self, tail: _LogTail, lines: list[str]) -> list[ev.Event]:
        if not lines:
            return []
        iteration = tail.iteration
        progress = latest_progress(iteration, lines)
        return [ev.LogLines(iteration, tuple(lines)), *([progress] if progress else [])]

    def _engine_state(self) -> list[ev.Event]:
        """One EngineError when the engine process is gone before the run ended."""
        if self.reader.stopped is not None:
            return []
        running = self.reader.engine_running()
        if running:
            self._engine_gone_reported = False
            return []
        if self._engine_gone_reported:
            return []
        self._engine_gone_reported = True
        return [ev.EngineError(
            f"no engine is driving run '{self.info.name}' (it crashed or was killed): "
            f"`proctor resume {self.info.name}` continues it")]
