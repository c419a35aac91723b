"""The iteration loop: select -> propose -> review -> apply -> run -> evaluate -> record.

Every step is journaled before the next one starts, so a run killed at any point resumes
under the same iteration number, from its last completed step, without asking the agent
again for a proposal it already stored. Events go out through `publish`; commands come in
through `submit` (same process) or the journal (other processes)."""

from __future__ import annotations

import asyncio
import copy
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from engine import events as ev
from engine.agents.base import Agent, AgentContext, NodeSummary, Repair
from engine.config import ExperimentConfig
from engine.edits import EditError, apply_edits, unified_diff
from engine.journal import Journal, RunEvent, Step
from engine.logs import RunLogs, log_tail
from engine.proposal import Proposal, Strategy
from engine.runner import (
    ProcessIdentity,
    Runner,
    RunRequest,
    RunResult,
    RunStatus,
    kill_orphan,
    make_runner,
)
from engine.tree import Node, NodeStatus, Tree, block_of
from engine.workspace import CodeStore

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
PROGRESS = re.compile(r"\bstep\s+(\d+)\s*/\s*(\d+)")
# Keys an agent may set outside the search space (the protocol's Step 5.1 exceptions).
REGIME_KEYS = {"dataset.field", "dataset.n_frames"}
SEED_KEY = "training.seed"
COMMAND_POLL_S = 0.25

_STATUS_OF_RUN = {
    RunStatus.OK: NodeStatus.DONE,
    RunStatus.DIVERGED: NodeStatus.DIVERGED,
}


class EngineError(Exception):
    """A problem that stops the engine, worded for the user."""


class ProposalRejected(ValueError):
    """A proposal the engine refuses before anything is applied."""


@dataclass(frozen=True)
class RunSettings:
    """What `proctor run` decided; stored with the run so a resume behaves the same."""

    name: str
    config_path: str
    iterations: int
    approval: str
    agent: str
    runner: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSettings:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__})


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
    ):
        self.run_dir = run_dir
        self.project_root = project_root
        self.config = config
        self.settings = settings
        self.agent = agent
        self.journal = journal
        self.publish = publish
        self.exploration = config.exploration
        self.logs = RunLogs(run_dir, journal)
        package = self.exploration.harness.split(".")[0]
        self.code = CodeStore(run_dir, package, self.exploration.editable_files)
        self.tree = Tree(
            block_size=self.exploration.block_size,
            score=self.exploration.score,
            c=self.exploration.ucb_c,
        )
        self.runner = runner or make_runner(settings.runner)
        self._commands: asyncio.Queue[ev.Command] = asyncio.Queue()
        self._stop_reason: str | None = None
        self._started_at = time.monotonic()
        self._changes: dict[int, dict[str, Any]] = {}
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
        """Start a new run under `log/<name>/`; refuses a name that is taken."""
        if not RUN_NAME.match(settings.name):
            raise EngineError(f"run name '{settings.name}' must be letters, digits, '_', '.', '-'")
        run_dir = project_root / "log" / settings.name
        if (run_dir / "journal.sqlite").exists():
            raise EngineError(
                f"run '{settings.name}' already exists in {run_dir}: "
                f"use `proctor resume {settings.name}` or pick another --name"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        journal = Journal.open_for_engine(run_dir)
        try:
            code = CodeStore(
                run_dir, config.exploration.harness.split(".")[0], config.exploration.editable_files
            )
            code.snapshot_base(project_root)
            (run_dir / "config.yaml").write_text(
                yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
            )
            journal.append_run_event(
                RunEvent.RUN_CREATED,
                {"settings": asdict(settings), "config": config.model_dump(mode="json"),
                 "project_root": str(project_root)},
            )
            RunLogs(run_dir, journal).init_memory(None)
        except BaseException:
            journal.close()
            raise
        return cls(run_dir, project_root, config, settings, agent, journal, publish, runner)

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
            agent = agent_factory(config, settings)
        except BaseException:
            journal.close()
            raise
        project_root = Path(record["project_root"])
        return cls(run_dir, project_root, config, settings, agent, journal, publish)

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
        """Pause/resume/stop; True when the command was one of those."""
        if isinstance(command, ev.Stop):
            self._stop_reason = command.reason
            return True
        if isinstance(command, ev.Pause):
            self.journal.set_state("paused", command.reason)
            self.journal.append_run_event(RunEvent.PAUSED, {"reason": command.reason})
            self.publish(ev.Paused(command.reason))
            return True
        if isinstance(command, ev.ResumeRun):
            if self.journal.state("paused") is not None:
                self.journal.set_state("paused", None)
                self.journal.append_run_event(RunEvent.RESUMED, {})
                self.publish(ev.Resumed())
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

    async def _wait_while_paused(self) -> None:
        reason = self.journal.state("paused")
        if reason is None:
            return
        self.publish(ev.Paused(reason))
        while self.journal.state("paused") is not None and self._stop_reason is None:
            command = await self._next_command()
            if command is not None:
                self._handle_global(command)

    def _drain_globals(self) -> None:
        for command in self._pending_commands():
            if not self._handle_global(command):
                self._commands.put_nowait(command)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> ev.RunFinished:
        """Run iterations until a stop condition; returns why it ended."""
        self.logs.repair_tails()
        unfinished = self.journal.unfinished_iteration()
        self.publish(ev.RunOpened(self.settings.name, str(self.run_dir), self.settings.iterations,
                                  resumed_at=unfinished))
        try:
            await self._kill_orphaned_run()
            iteration = unfinished or self.journal.next_iteration()
            while True:
                self._drain_globals()
                await self._wait_while_paused()
                reason = self._stop_condition(iteration)
                if reason is not None:
                    break
                await self._iteration(iteration)
                iteration = self.journal.next_iteration()
        finally:
            await self.runner.aclose()
        self._flush_analysis(next_parent=None, analysis="")
        best = self.tree.best_node()
        finished = ev.RunFinished(reason, best.id if best else None,
                                  best.metrics.get("final_r2") if best else None)
        self.journal.append_run_event(RunEvent.STOPPED, {"reason": reason})
        self.publish(finished)
        return finished

    def close(self) -> None:
        self.journal.close()

    def _stop_condition(self, iteration: int) -> str | None:
        if self._stop_reason is not None:
            return self._stop_reason
        if iteration > self.settings.iterations:
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
            proposal = await self._proposal(iteration, attempt, repair, rejections)
            if proposal is None:
                return
            try:
                node, files, diff = self._prepare(iteration, proposal)
            except ProposalRejected as exc:
                invalid_tries += 1
                self.publish(ev.ProposalInvalid(iteration, str(exc), invalid_tries))
                if invalid_tries > self.exploration.repair_attempts:
                    self._skip(iteration, attempt, f"invalid proposal: {exc}")
                    return
                repair = Repair(invalid_tries, self.exploration.repair_attempts, proposal, str(exc))
                attempt += 1
                continue
            approved, reason = await self._review(iteration, attempt, proposal, diff, node)
            if self._stop_reason is not None and not approved:
                return
            if not approved:
                rejections.append(reason)
                repair = None
                attempt += 1
                continue
            self._apply(iteration, attempt, proposal, node, files, diff)
            result = await self._run(iteration, attempt, node, files)
            if result.status is RunStatus.STOPPED:
                return
            node = self._finish_node(iteration, attempt, node, result)
            repairs_used = sum(1 for p in self._attempt_proposals(iteration)
                               if p.strategy == Strategy.REPAIR)
            if (node.status is not NodeStatus.DONE and proposal.changes_code
                    and repairs_used < self.exploration.repair_attempts):
                error = result.error or result.status.value
                tail = result.traceback_tail or ""
                repair = Repair(repairs_used + 1, self.exploration.repair_attempts, proposal,
                                f"{error}\n{tail}".strip())
                attempt += 1
                continue
            self._record(iteration, attempt, proposal, node, result)
            return

    def _resume_attempt(self, iteration: int) -> int:
        events = [e for e in self.journal.events(iteration) if e.step != "agent_exchange"]
        return max((e.attempt for e in events), default=0)

    def _attempt_proposals(self, iteration: int) -> list[Proposal]:
        return [Proposal.model_validate(e.payload["proposal"])
                for e in self.journal.events(iteration) if e.step == Step.PROPOSAL_STORED]

    # -- propose ----------------------------------------------------------------------------

    async def _proposal(
        self, iteration: int, attempt: int, repair: Repair | None, rejections: list[str]
    ) -> Proposal | None:
        stored = self.journal.payload(iteration, Step.PROPOSAL_STORED, attempt)
        if stored is not None:
            return Proposal.model_validate(stored["proposal"])
        context = self._context(iteration, repair, rejections)
        try:
            reply = await self.agent.propose(context)
        except Exception as exc:  # an agent failure skips the iteration, never the run
            self._skip(iteration, attempt, f"agent failed: {type(exc).__name__}: {exc}")
            return None
        proposal = reply.proposal
        self.logs.append_reasoning(iteration, reply.reasoning or proposal.analysis)
        self.journal.append(iteration, Step.PROPOSAL_STORED,
                            {"proposal": proposal.model_dump(mode="json"),
                             "cost_usd": reply.cost_usd}, attempt=attempt)
        self._flush_analysis(next_parent=proposal.parent_id, analysis=proposal.analysis)
        return proposal

    def _context(
        self, iteration: int, repair: Repair | None, rejections: list[str]
    ) -> AgentContext:
        size = self.exploration.block_size
        block = block_of(iteration, size)
        candidates = tuple(row.node_id for row in self.tree.candidates(iteration))
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
            nodes=tuple(self._summary(node, iteration) for node in self.tree),
            candidates=candidates,
            latest_log_tail=tail,
            rejections=tuple(rejections),
            repair=repair,
            read_file=self._read_file,
        )

    def _summary(self, node: Node, iteration: int) -> NodeSummary:
        changes = self._changes.get(node.id)
        if changes is None:  # a node's config never changes: diff it against its parent once
            changes = {key: new for key, (_, new) in
                       config_changes(self._parent_config(node), node.config).items()}
            self._changes[node.id] = changes
        return NodeSummary(
            id=node.id, parent_id=node.parent_id, block=node.block, status=str(node.status),
            strategy=node.strategy, mutation=node.mutation, code_changed=node.code_changed,
            config_changes=changes, config=node.config, metrics=dict(node.metrics),
            score=self.tree.score(node.id, iteration) if node.finished else None,
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

    def _code_owner(self, node_id: int | None) -> int | None:
        while node_id is not None:
            node = self.tree.get(node_id)
            if node.code_changed:
                return node.id
            node_id = node.parent_id
        return None

    def _files_at(self, node_id: int | None) -> dict[str, str]:
        return self.code.files_at(node_id, self._code_owner)

    def _prepare(self, iteration: int, proposal: Proposal) -> tuple[Node, dict[str, str], str]:
        """Validate a proposal and build its node (nothing written yet)."""
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
        config = parent_config
        for key, value in proposal.config_changes.items():
            self._check_change(key, value, proposal.strategy)
            config = set_dotted(config, key, value)
        before = self._files_at(parent_id)
        try:
            changed = apply_edits(before, proposal.edits, self.exploration.editable_files)
        except EditError as exc:
            raise ProposalRejected(str(exc)) from None
        files = {**before, **changed}
        diff = unified_diff(before, files)
        mutation = proposal.mutation or describe_changes(
            config_changes(parent_config, config), "; ") or "none"
        node = Node(
            id=iteration, parent_id=parent_id, config=config, code_changed=bool(changed),
            status=NodeStatus.PENDING, author="agent", strategy=str(proposal.strategy),
            mutation=mutation, block=block_of(iteration, self.exploration.block_size),
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
        self, iteration: int, attempt: int, proposal: Proposal, diff: str, node: Node
    ) -> tuple[bool, str]:
        stored = self.journal.payload(iteration, Step.DECISION, attempt)
        if stored is not None:
            return stored["approved"], stored.get("reason", "")
        changes = describe_changes(config_changes(self._parent_config(node), node.config))
        waiting = self._needs_review(proposal)
        self.publish(ev.ProposalReady(iteration, proposal, diff, changes, waiting))
        approved, reason, by = True, "", "policy"
        if waiting:
            approved, reason, by = await self._await_decision(iteration)
            if self._stop_reason is not None and by == "stop":
                return False, self._stop_reason
        self.journal.append(iteration, Step.DECISION,
                            {"approved": approved, "reason": reason, "by": by}, attempt=attempt)
        self.publish(ev.ProposalDecided(iteration, approved, reason, by))
        return approved, reason

    async def _await_decision(self, iteration: int) -> tuple[bool, str, str]:
        while True:
            command = await self._next_command()
            if command is None:
                continue
            if self._handle_global(command):
                if self._stop_reason is not None:
                    return False, self._stop_reason, "stop"
                continue
            if getattr(command, "iteration", None) not in (None, iteration):
                continue
            if isinstance(command, ev.Approve):
                return True, "", "human"
            if isinstance(command, ev.Reject):
                return False, command.reason, "human"

    # -- apply, run, record -----------------------------------------------------------------

    def _apply(self, iteration: int, attempt: int, proposal: Proposal, node: Node,
               files: dict[str, str], diff: str) -> None:
        if self.journal.payload(iteration, Step.APPLIED, attempt) is not None:
            if iteration not in self.tree:
                self.tree.add(node)
            return
        if node.code_changed:
            self.code.store(iteration, files)
        changes = config_changes(self._parent_config(node), node.config)
        self.logs.write_change(iteration, diff, describe_changes(changes))
        if proposal.memory:
            self.logs.rewrite_memory(proposal.memory)
            for note in self.journal.state("do_not_retry", []):
                self.logs.add_do_not_retry(note)  # the agent may not drop proctor's notes
        if iteration in self.tree:
            self.tree.update(iteration, status=NodeStatus.PENDING)
        else:
            self.tree.add(node)
        self.journal.append(iteration, Step.APPLIED, {"node": node.to_dict()}, attempt=attempt)

    async def _run(self, iteration: int, attempt: int, node: Node,
                   files: dict[str, str]) -> RunResult:
        stored = self.journal.payload(iteration, Step.RUN_FINISHED, attempt)
        if stored is not None:
            return RunResult.from_dict(stored["result"])
        node_dir = self.logs.node_dir(iteration)
        workspace = self.code.materialise(files, self.run_dir / "workspace")
        results = node_dir / "results.json"
        results.unlink(missing_ok=True)
        request = RunRequest(
            workspace=workspace,
            config_path=self.logs.write_config_snapshot(iteration, node.config | {
                "exploration": self.config.exploration.model_dump(mode="json")}),
            results_path=results,
            log_path=node_dir / "training.log",
            harness=self.exploration.harness,
            extra_args=("--data-cache", str(self.project_root / "log" / "cache" / "data")),
            timeouts=self.exploration.timeouts,
            limits=self.exploration.limits,
        )
        self.tree.update(iteration, status=NodeStatus.RUNNING)

        def started(identity: ProcessIdentity) -> None:
            self.journal.set_state("active_run", asdict(identity))
            self.journal.append(iteration, Step.RUN_STARTED, asdict(identity), attempt=attempt)
            self.publish(ev.TrainingStarted(iteration, node.id, node.parent_id, node.mutation,
                                            identity.pid))

        def output(lines: list[str]) -> None:
            self.publish(ev.LogLines(iteration, tuple(lines)))
            for line in reversed(lines):
                match = PROGRESS.search(line)
                if match:
                    self.publish(ev.TrainingProgress(iteration, int(match[1]), int(match[2])))
                    break

        watcher = asyncio.create_task(self._watch_during_run())
        try:
            result = await self.runner.run(request, on_output=output, on_started=started)
        finally:
            watcher.cancel()
        self.journal.set_state("active_run", None)
        if result.status is not RunStatus.STOPPED:
            self.journal.append(iteration, Step.RUN_FINISHED, {"result": result.to_dict()},
                                attempt=attempt)
        return result

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
        self.publish(ev.NodeFinished(
            iteration, iteration, str(status), dict(result.metrics), result.error,
            best.metrics.get("final_r2") if best else None,
        ))
        return finished

    def _record(self, iteration: int, attempt: int, proposal: Proposal, node: Node,
                result: RunResult) -> None:
        if node.status is not NodeStatus.DONE and proposal.changes_code:
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
