"""The iteration loop: select -> propose -> review -> apply -> run -> evaluate -> record.

Every step is journaled before the next one starts, so a run killed at any point resumes
under the same iteration number, from its last completed step, without asking the agent
again for a proposal it already stored. Events go out through `publish`; commands come in
through `submit` (same process) or the journal (other processes).

Code lives in git (`engine.vcs`): a node that changes code is a commit on its parent's
commit; every run executes from a workspace rebuilt at its node's commit. Humans add nodes
too: a revert, an adopted manual edit, or the pre-existing changes of a dirty checkout are
queued (durably, in the journal) and take the next iteration number."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import math
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from engine import events as ev
from engine.agents.base import Agent, AgentContext, AgentPaused, NodeSummary, Repair
from engine.atomic import write_atomic
from engine.config import ExperimentConfig
from engine.edits import EditError, apply_edits, check_parses, unified_diff, validate_files
from engine.evaluation import EvaluationPlan, evaluate
from engine.journal import Journal, RunEvent, Step
from engine.logs import RunLogs, log_tail
from engine.proposal import CodeChange, Proposal, Strategy
from engine.runner import (
    ProcessIdentity,
    Runner,
    RunResult,
    RunStatus,
    kill_orphan,
    make_runner,
)
from engine.runner.sandbox import missing_layers
from engine.tree import Node, NodeStatus, ScoreRow, Tree, block_of
from engine.vcs import (
    Identity,
    Lineage,
    ProjectState,
    RepoInfo,
    VcsError,
    change_counts,
    commit_message,
    create_private,
    inspect_project,
    merge_texts,
    package_files,
    user_identity,
)
from engine.watch import CHECKOUT, WORKSPACE, EditWatcher, ManualEdit, ManualEdits
from engine.workspace import VCS_FILE, CodeStore

SANDBOX_KEY = "sandbox_missing"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
PROGRESS = re.compile(r"\bstep\s+(\d+)\s*/\s*(\d+)")
# Keys an agent may set outside the search space (the protocol's Step 5.1 exceptions).
REGIME_KEYS = {"dataset.field", "dataset.n_frames"}
SEED_KEY = "training.seed"
COMMAND_POLL_S = 0.25
HUMAN_QUEUE_KEY = "human_queue"
STALE_KEY = "stale_proposal"
POLICY_KEY = "policy_violations"

_STATUS_OF_RUN = {
    RunStatus.OK: NodeStatus.DONE,
    RunStatus.DIVERGED: NodeStatus.DIVERGED,
}


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return "disk is full" in str(exc) or "disk I/O error" in str(exc)


class EngineError(Exception):
    """A problem that stops the engine, worded for the user."""


class ProposalRejected(ValueError):
    """A proposal the engine refuses before anything is applied."""

    def __init__(self, message: str, *, policy_violation: bool = False):
        super().__init__(message)
        self.policy_violation = policy_violation


@dataclass(frozen=True)
class RunSettings:
    """What `proctor run` decided; stored with the run so a resume behaves the same."""

    name: str
    config_path: str
    iterations: int
    approval: str
    agent: str
    runner: str
    watch_edits: bool = True  # watch the editable files for manual edits

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        fields = cls.__dataclass_fields__
        return cls(**{key: data[key] for key in fields if key in data})


@dataclass(frozen=True)
class HumanChange:
    """A node a human asked for: a revert, an adopted manual edit, pre-existing changes."""

    request_id: str
    kind: str  # "revert" | "manual-edit" | "pre-existing"
    parent_id: int | None
    files: dict[str, str]  # whole texts of the editable files that change
    config: dict[str, Any] | None  # None: the parent's config
    title: str
    author: dict[str, str] = field(default_factory=dict)  # name, email
    reverted_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HumanChange:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})

    def proposal(self) -> Proposal:
        """How the change reads in the logs: a proposal by a human."""
        revert = self.kind == "revert"
        label = f"[revert] node {self.reverted_id}" if revert else \
            f"[manual] {', '.join(sorted(self.files)) or 'no code'}"
        first = min(self.files, default="")
        return Proposal(
            parent_id=self.parent_id,
            strategy=Strategy.REVERT if revert else Strategy.MANUAL,
            code_change=CodeChange(file=first, change=self.title) if first else None,
            mutation=label, parent_rule="chosen by a human", analysis="",
        )


@dataclass(frozen=True)
class Decision:
    """The review's outcome; `files` holds the human's edited version when they edited it."""

    approved: bool
    reason: str = ""
    by: str = "policy"
    files: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"approved": self.approved, "reason": self.reason,
                                  "by": self.by}
        if self.files is not None:
            record |= {"edited": True, "files": self.files}
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(data["approved"], data.get("reason", ""), data.get("by", "policy"),
                   data.get("files"))


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with `dotted` set to `value`."""
    updated = copy.deepcopy(config)
    node = updated
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return updated


def config_changes(
    before: dict[str, Any], after: dict[str, Any], prefix: str = ""
) -> dict[str, tuple[Any, Any]]:
    """Every leaf that differs, as dotted key -> (old, new)."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(before) | set(after)):
        dotted = f"{prefix}{key}"
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes.update(config_changes(old, new, dotted + "."))
        elif old != new:
            changes[dotted] = (old, new)
    return changes


def describe_changes(changes: dict[str, tuple[Any, Any]], separator: str = "\n") -> str:
    """`key: old -> new` per change."""
    return separator.join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def _package(config: ExperimentConfig) -> str:
    return config.exploration.harness.split(".")[0]


def _check_project(
    project_root: Path, config: ExperimentConfig, publish: Callable
) -> ProjectState:
    """The project's git state before a run is created; EngineError with instructions when
    it cannot start (uncommitted editable files under `dirty: refuse`, no commit yet...)."""
    exploration = config.exploration
    try:
        state = inspect_project(project_root, exploration.editable_files, _package(config))
    except VcsError as exc:
        raise EngineError(str(exc)) from None
    if state.warning:
        publish(ev.EngineError(state.warning))
    dirty = state.uncommitted
    if dirty and exploration.dirty == "refuse":
        names = " ".join(sorted(dirty))
        raise EngineError(
            f"uncommitted changes to editable files: {names}. proctor starts from your last "
            f"commit and never stashes, resets or commits your work. Commit them "
            f"(git commit {names}), set them aside yourself (git stash), or set "
            "exploration.dirty: adopt to start with them as a 'pre-existing changes' node")
    if dirty:
        try:
            check_parses(dirty)
        except EditError as exc:
            raise EngineError(f"the uncommitted editable files cannot be adopted: {exc}") \
                from None
    return state


class Engine:
    """Drives one run. Create with `Engine.create` or `Engine.reopen`, then `await run()`."""

    def __init__(
        self,
        run_dir: Path,
        project_root: Path,
        config: ExperimentConfig,
        settings: RunSettings,
        agent: Agent,
        journal: Journal,
        publish: Callable[[ev.Event], None] = lambda event: None,
        runner: Runner | None = None,
        repo: RepoInfo | None = None,
    ):
        self.run_dir = run_dir
        self.project_root = project_root
        self.config = config
        self.settings = settings
        self.agent = agent
        self.journal = journal
        attach_journal = getattr(agent, "attach_journal", None)
        if attach_journal is not None:
            attach_journal(journal)  # agents that store their exchanges (Claude) need it
        self.publish = publish
        self._pause_reason: str | None = None
        self.exploration = config.exploration
        self.logs = RunLogs(run_dir, journal)
        if repo is None:
            repo = _stored_repo(journal, run_dir)
        self.lineage = Lineage(repo, settings.name, run_dir)
        self.code = CodeStore(run_dir, _package(config), self.exploration.editable_files,
                              self.lineage)
        self.manual = ManualEdits(journal, self.exploration.editable_files)
        self.tree = Tree(
            block_size=self.exploration.block_size,
            score=self.exploration.score,
            c=self.exploration.ucb_c,
        )
        self.runner = runner or make_runner(settings.runner)
        self._commands: asyncio.Queue[ev.Command] = asyncio.Queue()
        self._stop_reason: str | None = None
        self._started_at = time.monotonic()
        self._summary_cache: dict[int, NodeSummary] = {}
        self._reviewing: tuple[int, frozenset[str]] | None = None
        self._human: Identity | None = None
        self._resumed_at = journal.unfinished_iteration()
        self._watcher: EditWatcher | None = None
        self._rebuild_tree()

    # -- opening a run ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        project_root: Path,
        config: ExperimentConfig,
        settings: RunSettings,
        agent: Agent,
        publish: Callable[[ev.Event], None] = lambda event: None,
        runner: Runner | None = None,
    ) -> Engine:
        """Start a new run under `log/<name>/`; refuses a name that is taken, and a checkout
        whose editable files have uncommitted changes (unless `exploration.dirty: adopt`)."""
        if not RUN_NAME.match(settings.name):
            raise EngineError(f"run name '{settings.name}' must be letters, digits, '_', '.', '-'")
        project_root = project_root.resolve()
        run_dir = project_root / "log" / settings.name
        if (run_dir / "journal.sqlite").exists():
            raise EngineError(
                f"run '{settings.name}' already exists in {run_dir}: "
                f"use `proctor resume {settings.name}` or pick another --name"
            )
        project = _check_project(project_root, config, publish)
        repo, dirty = project.repo, project.uncommitted
        run_dir.mkdir(parents=True, exist_ok=True)
        journal = Journal.open_for_engine(run_dir)
        try:
            if repo is None:  # not a git project: a private repository in the run folder
                paths = sorted({*package_files(project_root, _package(config)),
                                *config.exploration.editable_files})
                repo = create_private(run_dir, project_root, paths, time.time())
            lineage = Lineage(repo, settings.name, run_dir)
            lineage.set_refs({lineage.ref("base"): repo.base})
            write_atomic(run_dir / VCS_FILE, yaml.safe_dump(repo.to_dict(), sort_keys=False))
            (run_dir / "config.yaml").write_text(
                yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
            )
            journal.append_run_event(
                RunEvent.RUN_CREATED,
                {"settings": asdict(settings), "config": config.model_dump(mode="json"),
                 "project_root": str(project_root), "repo": repo.to_dict()},
            )
            ManualEdits(journal, config.exploration.editable_files).remember_checkout(
                project.checkout)
            if dirty:
                author = user_identity(repo.path)
                change = HumanChange(
                    request_id="pre-existing", kind="pre-existing", parent_id=None,
                    files=dirty, config=None,
                    title=f"manual edit: pre-existing changes ({', '.join(sorted(dirty))})",
                    author=asdict(author))
                journal.set_state(HUMAN_QUEUE_KEY, [change.to_dict()])
            RunLogs(run_dir, journal).init_memory(None)
        except VcsError as exc:
            journal.close()
            raise EngineError(str(exc)) from None
        except BaseException:
            journal.close()
            raise
        return cls(run_dir, project_root, config, settings, agent, journal, publish, runner, repo)

    @classmethod
    def reopen(
        cls,
        run_dir: Path,
        agent_factory: Callable[[ExperimentConfig, RunSettings], Agent],
        publish: Callable[[ev.Event], None] = lambda event: None,
        iterations: int | None = None,
    ) -> Engine:
        """Resume an existing run from its journal (the config it was created with)."""
        journal = Journal.open_for_engine(run_dir)
        try:
            created = journal.run_events(RunEvent.RUN_CREATED)
            if not created:
                raise EngineError(f"{run_dir} has no record of its creation; cannot resume it")
            record = created[0].payload
            config = ExperimentConfig.model_validate(record["config"])
            settings = RunSettings.from_dict(record["settings"])
            if iterations is not None:
                settings = replace(settings, iterations=iterations)
            repo = _stored_repo(journal, run_dir)
            agent = agent_factory(config, settings)
        except BaseException:
            journal.close()
            raise
        project_root = Path(record["project_root"])
        return cls(run_dir, project_root, config, settings, agent, journal, publish, repo=repo)

    def _rebuild_tree(self) -> None:
        """The tree as the journal knows it: applied nodes, updated by their run results."""
        for iteration in sorted(set(self.journal.completed_iterations())
                                | set(self.journal.unfinished_iterations())):
            applied = self.journal.payload(iteration, Step.APPLIED)
            if applied is None:
                continue
            node = Node.from_dict(applied["node"])
            finished = self.journal.payload(iteration, Step.RECORDED)
            if finished is not None and finished.get("node"):
                node = Node.from_dict(finished["node"])
            elif iteration in self.journal.unfinished_iterations():
                continue  # re-entered by the resume: added when its step is replayed
            self.tree.add(node)

    # -- commands ---------------------------------------------------------------------------

    def submit(self, command: ev.Command) -> None:
        """Give the engine a command from the same process (the TUI)."""
        self._commands.put_nowait(command)

    def _pending_commands(self) -> list[ev.Command]:
        commands = []
        while not self._commands.empty():
            commands.append(self._commands.get_nowait())
        for stored in self.journal.take_commands():
            try:
                commands.append(ev.command_from_payload({"kind": stored.kind, **stored.payload}))
            except (KeyError, TypeError):
                self.publish(ev.EngineError(f"ignored an unknown command '{stored.kind}'"))
        return commands

    def _handle_global(self, command: ev.Command) -> bool:
        """Commands valid at any time (pause/resume/stop, revert, manual edits); True when
        the command was one of those."""
        if isinstance(command, ev.Stop):
            self._stop_reason = command.reason
            return True
        if isinstance(command, ev.Pause):
            self._pause(command.reason)
            return True
        if isinstance(command, ev.ResumeRun):
            if self._paused_reason() is not None:
                try:
                    self.journal.set_state("paused", None)
                    self.journal.append_run_event(RunEvent.RESUMED, {})
                except (OSError, sqlite3.Error) as exc:
                    self.publish(ev.EngineError(f"cannot resume yet: {exc}"))
                    return True
                self._pause_reason = None
                self.publish(ev.Resumed())
            return True
        if isinstance(command, ev.Revert):
            self._queue_revert(command.node_id)
            return True
        if isinstance(command, ev.AdoptManualEdit):
            self._adopt_manual(command.path)
            return True
        if isinstance(command, ev.IgnoreManualEdit):
            ignored = self.manual.resolve(command.path)
            if not ignored:
                self.publish(ev.EngineError(_no_manual_edit(command.path)))
            for edit in ignored:
                self.publish(ev.ManualEditResolved(edit.path, adopted=False))
            return True
        return False

    async def _next_command(self) -> ev.Command | None:
        """Wait up to one poll interval for a command from any source."""
        try:
            return await asyncio.wait_for(self._commands.get(), COMMAND_POLL_S)
        except TimeoutError:
            pending = self._pending_commands()
            for command in pending[1:]:
                self._commands.put_nowait(command)
            return pending[0] if pending else None

    def _pause(self, reason: str) -> None:
        """A durable pause (it survives a restart) that waits for ResumeRun; kept in memory
        too, so a pause for a full disk holds even when the journal cannot take it."""
        self._pause_reason = reason
        with contextlib.suppress(OSError, sqlite3.Error):
            self.journal.set_state("paused", reason)
            self.journal.append_run_event(RunEvent.PAUSED, {"reason": reason})
        self.publish(ev.Paused(reason))

    def _paused_reason(self) -> str | None:
        return self._pause_reason or self.journal.state("paused")

    async def _wait_while_paused(self) -> None:
        reason = self._paused_reason()
        if reason is None:
            return
        if self._pause_reason is None:
            self.publish(ev.Paused(reason))  # paused before a restart
        while self._paused_reason() is not None and self._stop_reason is None:
            command = await self._next_command()
            if command is not None:
                self._handle_global(command)

    def _drain_globals(self) -> None:
        for command in self._pending_commands():
            if not self._handle_global(command):
                self._commands.put_nowait(command)

    # -- humans' nodes: revert, adopted manual edits, pre-existing changes ------------------

    def _human_identity(self) -> dict[str, str]:
        if self._human is None:
            try:
                self._human = user_identity(self.lineage.info.path)
            except VcsError:
                self._human = Identity("human", "human@localhost")
        return asdict(self._human)

    def _human_queue(self) -> list[HumanChange]:
        return [HumanChange.from_dict(item) for item in self.journal.state(HUMAN_QUEUE_KEY, [])]

    def _queue_human(self, change: HumanChange) -> None:
        queue = self._human_queue()
        self.journal.set_state(HUMAN_QUEUE_KEY, [item.to_dict() for item in [*queue, change]])

    def _unqueue_human(self, request_id: str) -> None:
        queue = [item for item in self._human_queue() if item.request_id != request_id]
        self.journal.set_state(HUMAN_QUEUE_KEY, [item.to_dict() for item in queue] or None)

    def _queue_revert(self, node_id: int) -> None:
        """Queue a node with the code and config of `node_id`'s parent, as a child of it."""
        if node_id not in self.tree:
            self.publish(ev.EngineError(f"cannot revert node {node_id}: no such node"))
            return
        node = self.tree.get(node_id)
        if not node.finished:
            self.publish(ev.EngineError(f"cannot revert node {node_id}: it is {node.status}; "
                                        "only finished nodes can be reverted"))
            return
        try:
            restored = self._files_at(node.parent_id)
            current = self._files_at(node_id)
        except VcsError as exc:
            self.publish(ev.EngineError(f"cannot revert node {node_id}: {exc}"))
            return
        files = {path: text for path, text in restored.items() if current[path] != text}
        config = self._parent_config(node)
        if not files and config == node.config:
            self.publish(ev.EngineError(f"node {node_id} changed nothing to revert"))
            return
        origin = "the base" if node.parent_id is None else f"node {node.parent_id}"
        self._queue_human(HumanChange(
            request_id=f"revert-{node_id}-{time.time_ns()}", kind="revert", parent_id=node_id,
            files=files, config=config, title=f"Revert node {node_id} (back to {origin}'s code)",
            author=self._human_identity(), reverted_id=node_id))

    def _adopt_manual(self, path: str | None) -> None:
        """Queue the pending manual edits (of `path`, or all) as the next node's code."""
        edits = self.manual.pending(path)
        if not edits:
            self.publish(ev.EngineError(_no_manual_edit(path)))
            return
        parent_id = self._adoption_parent(edits)
        try:
            parent_files = self._files_at(parent_id)
            files = {}
            for edit in edits:
                merged = _merge_edit(edit, parent_files[edit.path])
                if merged is None:
                    where = "the base" if parent_id is None else f"node {parent_id}"
                    self.publish(ev.EngineError(
                        f"cannot adopt the manual edit of {edit.path}: it conflicts with "
                        f"{where}'s version; edit that version instead"))
                    return
                files[edit.path] = merged
            files = validate_files(files, parent_files, self.exploration.editable_files)
        except (EditError, VcsError) as exc:
            self.publish(ev.EngineError(f"cannot adopt the manual edit: {exc}"))
            return
        self.manual.resolve(path)
        names = ", ".join(sorted({edit.path for edit in edits}))
        self._queue_human(HumanChange(
            request_id=f"manual-{time.time_ns()}", kind="manual-edit", parent_id=parent_id,
            files=files, config=None, title=f"manual edit ({names})",
            author=self._human_identity()))
        for edit in edits:
            self.publish(ev.ManualEditResolved(edit.path, adopted=True))

    def _adoption_parent(self, edits: list[ManualEdit]) -> int | None:
        """The node an adopted edit builds on: the workspace's node when every edit was made
        there and it finished; else the best node (the root before any)."""
        nodes = {edit.node_id for edit in edits}
        if all(edit.where == WORKSPACE for edit in edits) and len(nodes) == 1:
            node_id = nodes.pop()
            if node_id is not None and node_id in self.tree and self.tree.get(node_id).finished:
                return node_id
        best = self.tree.best_node()
        return best.id if best is not None else None

    def _on_manual_change(self, where: str, path: str, text: str) -> None:
        """The watcher saw a whitelisted file change: report a human edit, mark a pending
        proposal on the same file stale. Nothing is overwritten either way."""
        edit = self.manual.observe(where, path, text)
        if edit is None:
            return
        self.publish(ev.ManualEditDetected(path, edit.diff, where))
        self._mark_stale(path)

    def _mark_stale(self, path: str) -> None:
        if self._reviewing is None or path not in self._reviewing[1]:
            return
        iteration = self._reviewing[0]
        stale = self.journal.state(STALE_KEY) or {"iteration": iteration, "paths": []}
        if path not in stale["paths"]:
            stale["paths"].append(path)
            self.journal.set_state(STALE_KEY, stale)
        self.publish(ev.ProposalStale(iteration, path))

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> ev.RunFinished:
        """Run iterations until a stop condition; returns why it ended."""
        self.logs.repair_tails()
        unfinished = self.journal.unfinished_iteration()
        missing = tuple(f"{layer.name}: {layer.detail}" for layer in missing_layers())
        self.journal.set_state(SANDBOX_KEY, list(missing))  # attached viewers show it too
        self.publish(ev.RunOpened(self.settings.name, str(self.run_dir), self.settings.iterations,
                                  resumed_at=unfinished, sandbox_missing=missing))
        watcher = self._watcher = self._start_watcher()
        try:
            await self._kill_orphaned_run()
            iteration = unfinished or self.journal.next_iteration()
            while True:
                self._drain_globals()
                await self._wait_while_paused()
                reason = self._stop_condition(iteration)
                if reason is not None:
                    break
                try:
                    await self._iteration(iteration)
                except (OSError, sqlite3.Error) as exc:
                    if not _disk_full(exc):
                        raise
                    self._pause(f"disk full while recording iteration {iteration} ({exc}); "
                                f"free some space, then resume the run")
                # a paused or interrupted iteration is re-entered, never skipped
                iteration = self.journal.unfinished_iteration() or self.journal.next_iteration()
        finally:
            if watcher is not None:
                await watcher.stop()
                self._watcher = None
            await self.runner.aclose()
            close_agent = getattr(self.agent, "aclose", None)
            if close_agent is not None:
                await close_agent()
        self._flush_analysis(next_parent=None, analysis="")
        best = self.tree.best_node()
        finished = ev.RunFinished(reason, best.id if best else None,
                                  best.metrics.get("final_r2") if best else None)
        self.journal.append_run_event(RunEvent.STOPPED, {"reason": reason})
        self.publish(finished)
        return finished

    def _start_watcher(self) -> EditWatcher | None:
        if not self.settings.watch_edits:
            return None
        workspace = self.run_dir / "workspace"
        workspace.mkdir(parents=True, exist_ok=True)
        watcher = EditWatcher(
            {CHECKOUT: self.project_root, WORKSPACE: workspace},
            self.exploration.editable_files, self._on_manual_change,
            lambda message: self.publish(ev.EngineError(message)))
        for edit in self.manual.pending():  # still waiting for a decision from before
            self.publish(ev.ManualEditDetected(edit.path, edit.diff, edit.where))
        watcher.check_now(CHECKOUT)  # edits made while no engine watched
        watcher.start()
        return watcher

    def close(self) -> None:
        self.journal.close()

    def _stop_condition(self, iteration: int) -> str | None:
        if self._stop_reason is not None:
            return self._stop_reason
        # a node a human asked for still runs after the last iteration
        if iteration > self.settings.iterations and not self.journal.state(HUMAN_QUEUE_KEY):
            return f"completed {self.settings.iterations} iterations"
        hours = self.exploration.max_wall_hours
        if hours is not None and time.monotonic() - self._started_at > hours * 3600:
            return f"wall-time limit of {hours} h reached"
        target = self.exploration.target_r2
        best = self.tree.best_node()
        if target is not None and best is not None and best.r2 >= target:
            return f"target R2 {target} reached by node {best.id}"
        return None

    async def _kill_orphaned_run(self) -> None:
        """A run left behind by a killed engine is stopped before anything else."""
        active = self.journal.state("active_run")
        if active is not None:
            if kill_orphan(ProcessIdentity(**active)):
                self.publish(ev.EngineError(f"killed the orphaned run of pid {active['pid']}"))
            self.journal.set_state("active_run", None)

    async def _iteration(self, iteration: int) -> None:
        block = block_of(iteration, self.exploration.block_size)
        first_in_block = (iteration - 1) % self.exploration.block_size == 0
        self.journal.append(iteration, Step.STARTED, {"block": block})
        if first_in_block:
            self.logs.snapshot_protocol(block, self._instructions())
        self.publish(ev.IterationStarted(iteration, block, self.settings.iterations))

        attempt = self._resume_attempt(iteration)
        rejections: list[str] = []
        repair: Repair | None = None
        invalid_tries = 0
        while True:
            proposed = await self._proposal(iteration, attempt, repair, rejections)
            if proposed is None:
                return
            proposal, human = proposed
            try:
                node, files, diff = self._prepare(iteration, proposal, human)
            except (ProposalRejected, VcsError) as exc:
                invalid_tries += 1
                self._report_invalid(iteration, attempt, exc, invalid_tries)
                if human is not None or invalid_tries > self.exploration.repair_attempts:
                    self._skip(iteration, attempt, f"invalid proposal: {exc}")
                    return
                repair = Repair(invalid_tries, self.exploration.repair_attempts, proposal, str(exc))
                attempt += 1
                continue
            decision = await self._review(iteration, attempt, proposal, human, diff, node)
            if self._stop_reason is not None and not decision.approved:
                return
            if not decision.approved:
                rejections.append(decision.reason)
                repair = None
                attempt += 1
                continue
            try:
                if decision.files is not None:  # the human's edited version is what runs
                    node, files, diff = self._prepare(iteration, proposal, human,
                                                      edited=decision.files)
                node = self._apply(iteration, attempt, proposal, human, node, files, diff,
                                   edited=decision.files is not None)
            except (ProposalRejected, VcsError, OSError) as exc:
                self.publish(ev.EngineError(f"iteration {iteration}: {exc}"))
                self._skip(iteration, attempt, f"could not apply: {exc}")
                return
            result = await self._run(iteration, attempt, node)
            if result.status is RunStatus.STOPPED:
                return
            node = self._finish_node(iteration, attempt, node, result)
            repairs_used = sum(1 for p in self._attempt_proposals(iteration)
                               if p.strategy == Strategy.REPAIR)
            if (node.status is not NodeStatus.DONE and human is None and node.code_changed
                    and repairs_used < self.exploration.repair_attempts):
                error = result.error or result.status.value
                tail = result.traceback_tail or ""
                repair = Repair(repairs_used + 1, self.exploration.repair_attempts, proposal,
                                f"{error}\n{tail}".strip())
                attempt += 1
                continue
            self._record(iteration, attempt, proposal, human, node, result)
            return

    def _report_invalid(self, iteration: int, attempt: int, exc: Exception, tries: int) -> None:
        """An invalid proposal: the agent hears why; a policy violation is also recorded."""
        self.publish(ev.ProposalInvalid(iteration, str(exc), tries))
        if getattr(exc, "policy_violation", False):
            record = {"iteration": iteration, "attempt": attempt, "error": str(exc),
                      "at": time.time()}
            violations = list(self.journal.state(POLICY_KEY, []))
            if (iteration, attempt) not in [(v["iteration"], v["attempt"]) for v in violations]:
                self.journal.set_state(POLICY_KEY, [*violations, record])
            self.publish(ev.PolicyViolation(iteration, str(exc)))

    def _resume_attempt(self, iteration: int) -> int:
        events = [e for e in self.journal.events(iteration) if e.step != "agent_exchange"]
        return max((e.attempt for e in events), default=0)

    def _attempt_proposals(self, iteration: int) -> list[Proposal]:
        return [Proposal.model_validate(e.payload["proposal"])
                for e in self.journal.events(iteration) if e.step == Step.PROPOSAL_STORED]

    # -- propose ----------------------------------------------------------------------------

    async def _proposal(
        self, iteration: int, attempt: int, repair: Repair | None, rejections: list[str]
    ) -> tuple[Proposal, HumanChange | None] | None:
        stored = self.journal.payload(iteration, Step.PROPOSAL_STORED, attempt)
        if stored is not None:
            human = HumanChange.from_dict(stored["human"]) if stored.get("human") else None
            if human is not None:
                self._unqueue_human(human.request_id)  # a crash may have left it queued
            return Proposal.model_validate(stored["proposal"]), human
        queue = self._human_queue()
        if attempt == 0 and queue:
            human = queue[0]
            proposal = human.proposal()
            self.logs.append_reasoning(iteration, f"{human.title} (asked by a human)")
            self.journal.append(iteration, Step.PROPOSAL_STORED,
                                {"proposal": proposal.model_dump(mode="json"), "cost_usd": 0.0,
                                 "human": human.to_dict()}, attempt=attempt)
            self._unqueue_human(human.request_id)
            self._flush_analysis(next_parent=proposal.parent_id, analysis="")
            return proposal, human
        context = self._context(iteration, attempt, repair, rejections)
        try:
            reply = await self.agent.propose(context)
        except AgentPaused as exc:  # spend limit, budget cap, API unreachable: wait for a human
            self._pause(exc.reason)
            return None
        except Exception as exc:  # an agent failure skips the iteration, never the run
            self._skip(iteration, attempt, f"agent failed: {type(exc).__name__}: {exc}")
            return None
        proposal = reply.proposal
        self.logs.append_reasoning(iteration, reply.reasoning or proposal.analysis)
        self.journal.append(iteration, Step.PROPOSAL_STORED,
                            {"proposal": proposal.model_dump(mode="json"),
                             "cost_usd": reply.cost_usd}, attempt=attempt)
        if reply.cost_usd:
            total = (self.journal.state("agent_cost") or {}).get("usd_total", reply.cost_usd)
            self.publish(ev.AgentCost(iteration, reply.cost_usd, total))
        self._flush_analysis(next_parent=proposal.parent_id, analysis=proposal.analysis)
        return proposal, None

    def _context(
        self, iteration: int, attempt: int, repair: Repair | None, rejections: list[str]
    ) -> AgentContext:
        size = self.exploration.block_size
        block = block_of(iteration, size)
        candidate_rows = self.tree.candidates(iteration)
        candidates = tuple(row.node_id for row in candidate_rows)
        score_table = self.tree.render_score_table(iteration)
        self.logs.write_scores(score_table)
        latest = max((node.id for node in self.tree), default=None)
        tail = ""
        if latest is not None:
            log = self.logs.node_dir(latest) / "training.log"
            tail = log_tail(log) if log.exists() else ""
        return AgentContext(
            iteration=iteration,
            block=block,
            iteration_in_block=(iteration - 1) % size + 1,
            block_size=size,
            block_end=iteration % size == 0,
            instructions=self._instructions(),
            memory=self.logs.read_memory(),
            score_table=score_table,
            config=self.config,
            nodes=self._summaries(iteration, candidate_rows),
            candidates=candidates,
            latest_log_tail=tail,
            rejections=tuple(rejections),
            repair=repair,
            read_file=self._read_file,
            attempt=attempt,
        )

    def _summaries(self, iteration: int, candidate_rows: list[ScoreRow]) -> tuple[NodeSummary, ...]:
        """Every node as the agent sees it. Scores exist for the current block and the
        candidates; other summaries only change with their node's status, so they are kept."""
        scores = {row.node_id: row.score for row in self.tree.rows(iteration)}
        scores.update((row.node_id, row.score) for row in candidate_rows)
        summaries = []
        for node in self.tree:
            kept = self._summary_cache.get(node.id)
            if node.id in scores or kept is None or kept.status != node.status:
                kept = self._summary(node, scores.get(node.id) if node.finished else None)
                if node.id not in scores:
                    self._summary_cache[node.id] = kept
            summaries.append(kept)
        return tuple(summaries)

    def _summary(self, node: Node, score: float | None) -> NodeSummary:
        changes = {key: new for key, (_, new) in
                   config_changes(self._parent_config(node), node.config).items()}
        return NodeSummary(
            id=node.id, parent_id=node.parent_id, block=node.block, status=str(node.status),
            strategy=node.strategy, mutation=node.mutation, code_changed=node.code_changed,
            config_changes=changes, config=node.config, metrics=dict(node.metrics),
            score=score,
        )

    def _parent_config(self, node: Node) -> dict[str, Any]:
        if node.parent_id is None:
            return self.config.experiment_sections()
        return self.tree.get(node.parent_id).config

    def _read_file(self, node_id: int | None, path: str) -> str:
        return self._files_at(node_id).get(path, "")

    def _instructions(self) -> str:
        path = self.project_root / self.exploration.instructions
        try:
            return path.read_text(encoding="utf-8")
        except OSError:
            return ""

    # -- validate and review ----------------------------------------------------------------

    def _commit_of(self, node_id: int | None) -> str:
        """The commit whose code a node runs (the base for the root)."""
        if node_id is None:
            return self.lineage.base
        node = self.tree.get(node_id)
        if node.commit is not None:
            return node.commit
        return self._commit_of(node.parent_id)

    def _files_at(self, node_id: int | None) -> dict[str, str]:
        return self.code.files_at_commit(self._commit_of(node_id))

    def _prepare(
        self, iteration: int, proposal: Proposal, human: HumanChange | None = None,
        edited: dict[str, str] | None = None,
    ) -> tuple[Node, dict[str, str], str]:
        """Validate a proposal and build its node (nothing written yet). `edited`: the
        human's version of the editable files, which replaces the proposal's edits."""
        parent_id = proposal.parent_id
        if parent_id is None:
            parent_config = self.config.experiment_sections()
        else:
            if parent_id not in self.tree:
                raise ProposalRejected(f"parent {parent_id} is not a node of the tree")
            parent = self.tree.get(parent_id)
            if parent.status in (NodeStatus.FAILED, NodeStatus.PENDING, NodeStatus.RUNNING):
                raise ProposalRejected(f"parent {parent_id} is {parent.status}: pick a finished "
                                       "node from the score table")
            parent_config = parent.config
        if human is not None and human.config is not None:
            config = human.config
        else:
            config = parent_config
            for key, value in proposal.config_changes.items():
                self._check_change(key, value, proposal.strategy)
                config = set_dotted(config, key, value)
        before = self._files_at(parent_id)
        whitelist = self.exploration.editable_files
        try:
            if edited is not None:
                changed = validate_files(edited, before, whitelist)
            elif human is not None:
                changed = validate_files(human.files, before, whitelist)
            else:
                changed = apply_edits(before, proposal.edits, whitelist)
        except EditError as exc:
            raise ProposalRejected(str(exc), policy_violation=exc.policy_violation) from None
        files = {**before, **changed}
        diff = unified_diff(before, files)
        mutation = proposal.mutation or describe_changes(
            config_changes(parent_config, config), "; ") or "none"
        node = Node(
            id=iteration, parent_id=parent_id, config=config, code_changed=files != before,
            status=NodeStatus.PENDING, author="agent" if human is None else "human",
            strategy=str(proposal.strategy), mutation=mutation,
            block=block_of(iteration, self.exploration.block_size),
        )
        return node, files, diff

    def _check_change(self, key: str, value: Any, strategy: Strategy) -> None:
        space = self.exploration.search_space
        if key in REGIME_KEYS or key == SEED_KEY:
            try:
                self.config.value_at(key)
            except KeyError:
                raise ProposalRejected(f"'{key}' is not a key of this experiment") from None
            return
        if key not in space:
            allowed = ", ".join(sorted(space)) or "none"
            raise ProposalRejected(f"'{key}' is not in the search space (allowed: {allowed})")
        spec = space[key]
        if spec.choices is not None:
            if value not in spec.choices:
                raise ProposalRejected(f"{key}={value!r} is not one of {spec.choices}")
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProposalRejected(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value) or not spec.low <= value <= spec.high:
            raise ProposalRejected(f"{key}={value!r} is outside [{spec.low}, {spec.high}]")
        if spec.integer and int(value) != value:
            raise ProposalRejected(f"{key} must be an integer, got {value!r}")

    def _needs_review(self, proposal: Proposal) -> bool:
        policy = self.settings.approval
        return policy == "all" or (policy == "code" and proposal.changes_code)

    async def _review(
        self, iteration: int, attempt: int, proposal: Proposal, human: HumanChange | None,
        diff: str, node: Node,
    ) -> Decision:
        stored = self.journal.payload(iteration, Step.DECISION, attempt)
        if stored is not None:
            return Decision.from_dict(stored)
        changes = describe_changes(config_changes(self._parent_config(node), node.config))
        # the diff is readable by any viewer before the decision, not only once applied
        self.logs.write_change(iteration, diff, changes)
        waiting = human is None and self._needs_review(proposal)
        self.publish(ev.ProposalReady(iteration, proposal, diff, changes, waiting))
        decision = Decision(True, by="human" if human is not None else "policy")
        if waiting:
            paths = frozenset(edit.file for edit in proposal.edits)
            self._reviewing = (iteration, paths)
            self.journal.set_state(STALE_KEY, None)
            for edit in self.manual.pending():  # a human edit already waiting on those files
                self._mark_stale(edit.path)
            try:
                decision = await self._await_decision(iteration, proposal, human)
            finally:
                self._reviewing = None
                self.journal.set_state(STALE_KEY, None)
            if self._stop_reason is not None and decision.by == "stop":
                return decision
        self.journal.append(iteration, Step.DECISION, decision.to_dict(), attempt=attempt)
        reason = decision.reason
        if decision.files is not None:
            reason = "edited by the human before approval"
        self.publish(ev.ProposalDecided(iteration, decision.approved, reason, decision.by))
        return decision

    async def _await_decision(
        self, iteration: int, proposal: Proposal, human: HumanChange | None
    ) -> Decision:
        while True:
            command = await self._next_command()
            if command is None:
                continue
            if self._handle_global(command):
                if self._stop_reason is not None:
                    return Decision(False, self._stop_reason, "stop")
                continue
            if getattr(command, "iteration", None) not in (None, iteration):
                continue
            if isinstance(command, ev.Approve):
                return Decision(True, by="human")
            if isinstance(command, ev.Reject):
                return Decision(False, command.reason, "human")
            if isinstance(command, ev.ApproveEdited):
                try:
                    self._prepare(iteration, proposal, human, edited=dict(command.files))
                except (ProposalRejected, VcsError) as exc:
                    self.publish(ev.EditedVersionInvalid(iteration, str(exc)))
                    continue
                return Decision(True, "edited", "human", dict(command.files))

    # -- apply, run, record -----------------------------------------------------------------

    def _apply(self, iteration: int, attempt: int, proposal: Proposal, human: HumanChange | None,
               node: Node, files: dict[str, str], diff: str, *, edited: bool = False) -> Node:
        """Commit the node's code (if it changed), write its diff, add it to the tree."""
        stored = self.journal.payload(iteration, Step.APPLIED, attempt)
        if stored is not None:
            node = Node.from_dict(stored["node"])
            self._put_node(node)
            return node
        parent_commit = self._commit_of(node.parent_id)
        if node.code_changed:
            # after a crash mid-commit: the refs name the commit if it got that far (if not,
            # committing again makes the identical commit: its dates are fixed)
            commit = self.lineage.node_attempt_commit(iteration, attempt) \
                if iteration == self._resumed_at else None
            if commit is None:
                before = self.code.files_at_commit(parent_commit)
                changed = {path: text for path, text in files.items() if before[path] != text}
                message = self._commit_message(iteration, proposal, human, before, files, edited)
                author = Identity(**human.author) if human is not None and human.author else \
                    Identity(f"proctor {self.agent.name} agent", "proctor@localhost")
                commit = self.lineage.commit_files(parent_commit, changed, message, author,
                                                   self._proposal_time(iteration, attempt))
                self.lineage.record_node(iteration, attempt, commit)
            node = replace(node, commit=commit)
            self.publish(ev.CodeCommitted(iteration, commit))
        else:
            node = replace(node, commit=parent_commit)
        if edited:  # the review wrote the proposal's diff; the human's version replaces it
            changes = config_changes(self._parent_config(node), node.config)
            self.logs.write_change(iteration, diff, describe_changes(changes))
        if proposal.memory:
            self.logs.rewrite_memory(proposal.memory)
            for note in self.journal.state("do_not_retry", []):
                self.logs.add_do_not_retry(note)  # the agent may not drop proctor's notes
        self._put_node(node)
        self.journal.append(iteration, Step.APPLIED, {"node": node.to_dict()}, attempt=attempt)
        if human is not None and human.kind == "revert":
            self.publish(ev.NodeReverted(iteration, human.reverted_id or 0, node.commit))
        return node

    def _put_node(self, node: Node) -> None:
        """Add an applied node, or refresh it for a later attempt of its iteration."""
        if node.id not in self.tree:
            self.tree.add(node)
            return
        current = self.tree.get(node.id)  # a repair: same id and parent, new code or config
        current.status = NodeStatus.PENDING
        current.config, current.commit = node.config, node.commit
        current.code_changed, current.mutation = node.code_changed, node.mutation
        current.strategy, current.author = node.strategy, node.author
        self._summary_cache.pop(node.id, None)

    def _proposal_time(self, iteration: int, attempt: int) -> float:
        """When this attempt's proposal was stored: the commit's fixed date."""
        for event in self.journal.events(iteration):
            if event.step == Step.PROPOSAL_STORED and event.attempt == attempt:
                return event.created_at
        return time.time()

    def _commit_message(self, iteration: int, proposal: Proposal, human: HumanChange | None,
                        before: dict[str, str], after: dict[str, str], edited: bool) -> str:
        code = proposal.code_change
        if human is not None:
            title = human.title
        elif code is not None:
            where = f" in {code.function}" if code.function and code.function != "module" \
                else ""
            title = f"{code.change}{where} ({code.file})"
        else:
            title = proposal.mutation or "code change"
        hypothesis = proposal.hypothesis
        if edited:
            hypothesis = (hypothesis + " " if hypothesis else "") + \
                "(edited by a human before approval)"
        return commit_message(iteration, title, hypothesis, change_counts(before, after),
                              self.settings.name, iteration)

    async def _run(self, iteration: int, attempt: int, node: Node) -> RunResult:
        stored = self.journal.payload(iteration, Step.RUN_FINISHED, attempt)
        if stored is not None:
            return RunResult.from_dict(stored["result"])
        node_dir = self.logs.node_dir(iteration)
        node_dir.mkdir(parents=True, exist_ok=True)
        commit = node.commit or self._commit_of(node.parent_id)
        if self._watcher is not None:  # an edit not reported yet must not vanish in the rebuild
            self._watcher.check_now(WORKSPACE)
        self.manual.expect_workspace(node.id, self.code.files_at_commit(commit))
        self.code.materialise(commit, self.run_dir / "workspace")  # the humans' view of it
        config_path = self.logs.write_config_snapshot(iteration, node.config | {
            "exploration": self.config.exploration.model_dump(mode="json")})
        self.tree.update(iteration, status=NodeStatus.RUNNING)

        steps_started = 0

        def started(identity: ProcessIdentity) -> None:  # once per step of the run
            nonlocal steps_started
            self.journal.set_state("active_run", asdict(identity))
            steps_started += 1
            if steps_started == 1:
                self.journal.append(iteration, Step.RUN_STARTED, asdict(identity),
                                    attempt=attempt)
                self.publish(ev.TrainingStarted(iteration, node.id, node.parent_id,
                                                node.mutation, identity.pid))

        def output(lines: list[str]) -> None:
            self.publish(ev.LogLines(iteration, tuple(lines)))
            for line in reversed(lines):
                match = PROGRESS.search(line)
                if match:
                    self.publish(ev.TrainingProgress(iteration, int(match[1]), int(match[2])))
                    break

        watcher = asyncio.create_task(self._watch_during_run())
        try:
            result = await evaluate(
                self.runner, self._evaluation_plan(), self.run_dir / "sandbox",
                lambda folder: self.code.materialise(commit, folder),
                config_path.read_text(encoding="utf-8"), node_dir / "training.log",
                seed=self.exploration.seed, on_output=output, on_started=started)
        finally:
            watcher.cancel()
        self.journal.set_state("active_run", None)
        if result.status is not RunStatus.STOPPED:
            self.journal.append(iteration, Step.RUN_FINISHED, {"result": result.to_dict()},
                                attempt=attempt)
        return result

    def _evaluation_plan(self) -> EvaluationPlan:
        key_file = self.config.exploration.anthropic.key_file
        return EvaluationPlan(
            harness=self.exploration.harness,
            data_cache=self.project_root / "log" / "cache" / "data",
            timeouts=self.exploration.timeouts,
            limits=self.exploration.limits,
            hide=(Path(key_file).expanduser(),) if key_file else (),
        )

    async def _watch_during_run(self) -> None:
        """Handle stop (and queue the rest) while a training run is going."""
        while True:
            await asyncio.sleep(COMMAND_POLL_S)
            for command in self._pending_commands():
                if isinstance(command, ev.Stop):
                    self._stop_reason = command.reason
                    await self.runner.stop_current()
                elif not self._handle_global(command):
                    self._commands.put_nowait(command)

    def _finish_node(self, iteration: int, attempt: int, node: Node, result: RunResult) -> Node:
        status = _STATUS_OF_RUN.get(result.status, NodeStatus.FAILED)
        self.tree.update(iteration, status=status, metrics=dict(result.metrics))
        finished = self.tree.get(iteration)
        self.logs.write_metrics(finished, result.error, run=result.to_dict())
        best = self.tree.best_node()
        if best is not None and best.commit is not None:
            try:
                warning = self.lineage.set_best(best.commit)
            except VcsError as exc:
                warning = f"could not move the best-node branch: {exc}"
            if warning:
                self.publish(ev.EngineError(warning))
        self.publish(ev.NodeFinished(
            iteration, iteration, str(status), dict(result.metrics), result.error,
            best.metrics.get("final_r2") if best else None,
        ))
        return finished

    def _record(self, iteration: int, attempt: int, proposal: Proposal, human: HumanChange | None,
                node: Node, result: RunResult) -> None:
        if node.status is not NodeStatus.DONE and node.code_changed and human is None:
            change = proposal.code_change.change if proposal.code_change else proposal.mutation
            detail = result.error.splitlines()[0] if result.error else "no detail"
            note = f"node {iteration}: {change} ({result.status.value}: {detail})"
            notes = list(self.journal.state("do_not_retry", []))
            if note not in notes:
                self.journal.set_state("do_not_retry", [*notes, note])
            self.logs.add_do_not_retry(note)
        pending = list(self.journal.state("unlogged", []))
        if iteration not in pending:
            pending.append(iteration)
        self.journal.set_state("unlogged", pending)
        self.logs.write_scores(self.tree.render_score_table(iteration + 1))
        if iteration % self.exploration.block_size == 0:
            self.logs.snapshot_memory(block_of(iteration, self.exploration.block_size))
        self.journal.append(iteration, Step.RECORDED, {"node": node.to_dict()}, attempt=attempt)

    def _skip(self, iteration: int, attempt: int, reason: str) -> None:
        self.journal.append(iteration, Step.RECORDED, {"node": None, "skipped": reason},
                            attempt=attempt)
        self.publish(ev.IterationSkipped(iteration, reason))

    def _flush_analysis(self, next_parent: int | None, analysis: str) -> None:
        """Write the analysis entries of nodes finished since the last proposal."""
        pending = list(self.journal.state("unlogged", []))
        keys = list(self.exploration.search_space)
        while pending:
            node_id = pending[0]
            node = self.tree.get(node_id)
            parent = self.tree.get(node.parent_id) if node.parent_id is not None else None
            proposal = self._attempt_proposals(node_id)[-1]
            entry = self.logs.format_entry(node, proposal, parent, next_parent, analysis, keys)
            self.logs.append_analysis(entry, node_id)
            pending.pop(0)
            self.journal.set_state("unlogged", pending)


def _stored_repo(journal: Journal, run_dir: Path) -> RepoInfo:
    created = journal.run_events(RunEvent.RUN_CREATED)
    record = created[0].payload if created else {}
    if "repo" not in record:
        raise EngineError(f"{run_dir} was created by a proctor without git lineage; "
                          "start a new run")
    return RepoInfo.from_dict(record["repo"])


def _no_manual_edit(path: str | None) -> str:
    return f"no pending manual edit of {path}" if path else "no pending manual edit"


def _merge_edit(edit: ManualEdit, current: str) -> str | None:
    """The human's change carried onto `current` (None: it conflicts)."""
    if current == edit.before:
        return edit.after
    return merge_texts(edit.before, current, edit.after)
