"""The iteration loop: select -> propose -> review -> apply -> run -> evaluate -> record.

Every step is journaled before the next one starts, so a run killed at any point resumes
under the same iteration number, from its last completed step, without asking the agent
again for a proposal it already stored. Events go out through `publish`; commands come in
through `submit` (same process) or the journal (other processes).

With `exploration.parallel: k`, k iterations are in flight at once, each in a slot of the
executor (`engine.executors`). Iteration numbers are taken in journal order when a slot
starts one; the agent is asked for one proposal at a time, with the other slots' unfinished
proposals in its context; a review holds only its own slot; a pause holds new starts and
approved changes, never a run already training.

A decision names the journaled review it answers (`proposal_id`): one for another proposal,
or sent while nothing waits, is refused at once, never held for a later proposal. Proposals
are checked in `engine.proposals`, humans' own nodes come from `engine.human`, code commits
from `engine.commits`, run folders are made and reopened by `engine.runs`."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from engine import events as ev
from engine.ab_runs import ABStopped, ABTest, ab_results
from engine.agent_view import AgentView
from engine.agents.base import Agent, AgentPaused, Repair
from engine.atomic import disk_full
from engine.attempt import Attempt, Decision
from engine.commits import NodeCommits
from engine.config import ExperimentConfig
from engine.executors import Executor, ExecutorError, NodeJob, Placement, make_executor
from engine.human import REVERT, HumanChange, HumanRequests
from engine.inbox import POLL_S, CommandInbox
from engine.journal import Journal, JournalLost, RunEvent, Step
from engine.logs import RunLogs, strip_control
from engine.paths import RunPaths
from engine.progress import latest_progress
from engine.proposal import Proposal, Strategy
from engine.proposals import ProposalChecker, ProposalRejected, needs_review, review_of
from engine.records import RunRecords, attempt_proposals, nodes_from_journal
from engine.review import Review, waiting_reviews
from engine.runner import Runner, RunResult, RunStatus, make_runner
from engine.runner.sandbox import missing_layers
from engine.runs import EngineError, OpenedRun, RunSettings, create_run, package_of, reopen_run
from engine.slots import Flight, Slots
from engine.state import RunState
from engine.tree import Node, NodeStatus, Tree, block_of, status_after_run
from engine.tree_picture import draw_tree_picture
from engine.vcs import Lineage, VcsError
from engine.watch import CHECKOUT, WORKSPACE, EditWatcher, ManualEdits
from engine.workspace import CodeStore


class Engine:
    """Drives one run. Create with `Engine.create` or `Engine.reopen`, then `await run()`."""

    def __init__(self, opened: OpenedRun, agent: Agent,
                 publish: Callable[[ev.Event], None] = lambda event: None,
                 runner: Runner | None = None, executor: Executor | None = None):
        self.run_dir = opened.run_dir
        self.paths = RunPaths(opened.run_dir)
        self.project_root = opened.project_root
        self.config: ExperimentConfig = opened.config
        self.settings = opened.settings
        self.agent = agent
        self.journal: Journal = opened.journal
        self.state = RunState(self.journal)
        attach_journal = getattr(agent, "attach_journal", None)
        if attach_journal is not None:
            attach_journal(self.journal)  # agents that store their exchanges (Claude) need it
        self.publish = publish
        self.exploration = self.config.exploration
        self.logs = RunLogs(self.run_dir, self.journal)
        self.lineage = Lineage(opened.repo, self.settings.name, self.run_dir)
        self.code = CodeStore(self.run_dir, package_of(self.config),
                              self.exploration.editable_files, self.lineage)
        self.manual = ManualEdits(self.journal, self.exploration.editable_files)
        self.tree = Tree(block_size=self.exploration.block_size, score=self.exploration.score,
                         c=self.exploration.ucb_c)
        self.checker = ProposalChecker(self.config, self.tree, self._files_at)
        self.humans = HumanRequests(self.state, self.tree, self.manual, opened.repo.path,
                                    self.exploration.editable_files, self._files_at,
                                    self.checker.parent_config, publish)
        self.view = AgentView(self.config, self.project_root, self.tree, self.checker, self.logs,
                              self.paths, self._files_at, self.journal)
        self.records = RunRecords(self.config, self.journal, self.logs, self.tree)
        try:
            self.executor = executor or make_executor(
                self.config, self.project_root, self.paths.sandbox,
                (lambda: runner) if runner is not None else
                (lambda: make_runner(self.settings.runner)), self.settings.runner)
        except ExecutorError as exc:
            raise EngineError(str(exc)) from None
        self.inbox = CommandInbox(self.journal, publish)
        self.flights = Slots(self.executor.slots, self.exploration)
        self._stop_reason: str | None = None
        self._pause_reason: str | None = None  # held in memory too: a full disk may refuse it
        self._started_at = time.monotonic()
        self._reviewing: dict[str, Attempt] = {}  # proposal id -> the attempt awaiting it
        self._early: dict[str, ev.Approve | ev.Reject | ev.ApproveEdited] = {}
        self._tick = asyncio.Event()  # set (and replaced) after every command acted on
        self._agent_turn: asyncio.Lock | None = None  # one proposal at a time
        self.commits = NodeCommits(self.lineage, self.code, self.journal, self.settings.name,
                                   agent.name, self.journal.unfinished_iterations())
        self._watcher: EditWatcher | None = None
        self._drawings: set[asyncio.Task[str | None]] = set()  # block-end tree pictures underway
        self.failure: str | None = None  # why the run ended in error (its journal was lost)
        for node in nodes_from_journal(self.journal):
            self.tree.add(node)
        self.tree.withheld.update(node_id for node_id, result in ab_results(self.journal).items()
                                  if result.verdict != "helped")

    @classmethod
    def create(cls, project_root: Path, config: ExperimentConfig, settings: RunSettings,
               agent: Agent, publish: Callable[[ev.Event], None] = lambda event: None,
               runner: Runner | None = None) -> Engine:
        """Start a new run under `log/<name>/` (see `engine.runs.create_run`)."""
        return cls(create_run(project_root, config, settings, publish), agent, publish, runner)

    @classmethod
    def reopen(cls, run_dir: Path,
               agent_factory: Callable[[ExperimentConfig, RunSettings], Agent],
               publish: Callable[[ev.Event], None] = lambda event: None,
               iterations: int | None = None) -> Engine:
        """Resume an existing run from its journal (the config it was created with)."""
        opened = reopen_run(run_dir, iterations)
        try:
            agent = agent_factory(opened.config, opened.settings)
        except BaseException:
            opened.journal.close()
            raise
        return cls(opened, agent, publish)

    def close(self) -> None:
        self.journal.close()

    @property
    def slots(self) -> int:
        return self.executor.slots

    # -- commands ---------------------------------------------------------------------------

    def submit(self, command: ev.Command) -> None:
        """Give the engine a command from the same process (the TUI)."""
        self.inbox.put(command)

    def _dispatch(self, command: ev.Command) -> None:
        """Act on one command now; a decision binds only to a review waiting now."""
        match command:
            case ev.Stop(reason=reason):
                self._stop_reason = reason
            case ev.Pause(reason=reason):
                self._pause(reason)
            case ev.ResumeRun():
                self._resume()
            case ev.Revert(node_id=node_id):
                self.humans.revert(node_id)
            case ev.AdoptManualEdit(path=path):
                self.humans.adopt(path)
            case ev.IgnoreManualEdit(path=path):
                self.humans.ignore(path)
            case ev.Approve() | ev.Reject() | ev.ApproveEdited():
                self._decide(command)
        self._tick.set()
        self._tick = asyncio.Event()

    def _decide(self, command: ev.Approve | ev.Reject | ev.ApproveEdited) -> None:
        attempt = self._reviewing.get(command.proposal_id)
        what = f"{type(command).__name__.lower()} of proposal {command.proposal_id}"
        if attempt is None or attempt.review is None or attempt.decision is not None:
            journaled = [review for review in waiting_reviews(self.journal)
                         if review.proposal_id not in self._reviewing]
            if any(review.proposal_id == command.proposal_id for review in journaled):
                self._early[command.proposal_id] = command  # decided while no engine ran
                return
            waiting = [a.review.summary() for a in self._reviewing.values()
                       if a.review is not None and a.decision is None]
            why = ("the one waiting is " + "; ".join(waiting)) if len(waiting) == 1 else \
                ("the ones waiting are " + "; ".join(waiting)) if waiting else \
                "nothing waits for review"
            self.publish(ev.EngineError(f"ignored the {what}: {why}"))
            return
        approver = strip_control(command.by) or self.humans.signature()
        if isinstance(command, ev.Reject):  # the agent and memory.md read the reason: text only
            attempt.decision = Decision(False, strip_control(command.reason), "human",
                                        approver=approver)
        elif isinstance(command, ev.Approve):
            attempt.decision = Decision(True, by="human", approver=approver)
        else:
            try:
                self.checker.prepare(attempt.iteration, attempt.proposal, attempt.human,
                                     edited=dict(command.files))
            except (ProposalRejected, VcsError) as exc:
                self.publish(ev.EditedVersionInvalid(attempt.iteration, str(exc)))
                return
            attempt.decision = Decision(True, "edited", "human", dict(command.files), approver)

    async def _pump_commands(self) -> None:
        """Act on commands as they come, whatever the slots are doing."""
        while True:
            command = await self.inbox.next()
            if command is not None:
                self._dispatch(command)

    async def _until(self, done: Callable[[], bool]) -> None:
        """Wait until `done()` holds or the run is stopping; checked after every command."""
        while not done() and self._stop_reason is None:
            tick = self._tick
            await tick.wait()

    def _pause(self, reason: str) -> None:
        """A durable pause (it survives a restart) that waits for ResumeRun; kept in memory
        too, so a pause for a full disk holds even when the journal cannot take it."""
        self._pause_reason = reason
        with contextlib.suppress(OSError, sqlite3.Error):
            self.state.paused = reason
            self.journal.append_run_event(RunEvent.PAUSED, {"reason": reason})
        self.publish(ev.Paused(reason))

    def _resume(self) -> None:
        if self._paused_reason() is None:
            return
        try:
            self.state.paused = None
            self.journal.append_run_event(RunEvent.RESUMED, {})
        except (OSError, sqlite3.Error) as exc:
            self.publish(ev.EngineError(f"cannot resume yet: {exc}"))
            return
        self._pause_reason = None
        self.publish(ev.Resumed())

    def _paused_reason(self) -> str | None:
        return self._pause_reason or self.state.paused

    async def _wait_while_paused(self) -> None:
        await self._until(lambda: self._paused_reason() is None)

    def _mark_stale(self, path: str) -> None:
        for attempt in self._reviewing.values():
            if attempt.review is None or path not in attempt.review.files:
                continue
            stale = self.state.stale_proposal or {"iteration": attempt.iteration, "paths": []}
            if stale["iteration"] == attempt.iteration and path not in stale["paths"]:
                stale["paths"].append(path)
                self.state.stale_proposal = stale
            self.publish(ev.ProposalStale(attempt.iteration, path))

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> ev.RunFinished:
        """Run iterations until a stop condition; returns why it ended."""
        self.logs.repair_tails()
        unfinished = self.journal.unfinished_iterations()
        missing = tuple(f"{layer.name}: {layer.detail}" for layer in missing_layers())
        self.state.sandbox_missing = missing  # attached viewers show it too
        slots = tuple(self.executor.describe(slot) for slot in range(1, self.slots + 1))
        self.state.slots = slots
        self.publish(ev.RunOpened(self.settings.name, str(self.run_dir), self.settings.iterations,
                                  resumed_at=unfinished[0] if unfinished else None,
                                  sandbox_missing=missing, slots=slots))
        self._agent_turn = asyncio.Lock()
        watcher = None
        if self.settings.watch_edits:
            self.paths.workspace.mkdir(parents=True, exist_ok=True)
            watcher = self._watcher = self.humans.watch(
                {CHECKOUT: self.project_root, WORKSPACE: self.paths.workspace}, self._mark_stale)
        pump = asyncio.create_task(self._pump_commands())
        reason = "stopped"
        try:
            await self.executor.start()
            await self._reclaim_orphaned_runs()
            reason = await self._drive()
        except ExecutorError as exc:
            self.failure = reason = str(exc)
            self.publish(ev.EngineError(reason))
        finally:
            pump.cancel()
            if watcher is not None:
                await watcher.stop()
                self._watcher = None
            await self.executor.aclose()
            await asyncio.gather(*self._drawings, return_exceptions=True)
            close_agent = getattr(self.agent, "aclose", None)
            if close_agent is not None:
                await close_agent()
        best = self.tree.best_node()
        finished = ev.RunFinished(reason, best.id if best else None,
                                  best.metrics.get("final_r2") if best else None)
        if self.failure is None:
            self.records.flush_analysis(next_parent=None, analysis="")
            self.journal.append_run_event(RunEvent.STOPPED, {"reason": reason})
        self.publish(finished)
        return finished

    async def _drive(self) -> str:
        """Keep up to `slots` iterations in flight until a stop condition; an interrupted
        iteration (a pause, a full disk) is re-entered first, never skipped."""
        tasks: dict[int, asyncio.Task[None]] = {}
        reason: str | None = None
        try:
            while True:
                for command in self.inbox.take_all():  # e.g. an adopt that asks for a node
                    self._dispatch(command)
                reason = self._stop_reason or self.failure
                if reason is None and self._paused_reason() is None and len(tasks) < self.slots:
                    iteration = self._next_iteration(tasks)
                    reason = self._stop_condition(iteration)
                    if reason is None:
                        with self._journal_faults(f"starting iteration {iteration}"):
                            tasks[iteration] = self._launch(iteration)
                        continue
                if not tasks and (reason is not None or self._stop_reason is not None):
                    return self._stop_reason or self.failure or reason or "stopped"
                await self._wait_for_change(tasks)
        finally:
            if tasks:
                self._stop_reason = self._stop_reason or "the engine is stopping"
                await self._stop_runs(tasks)
                await asyncio.gather(*tasks.values(), return_exceptions=True)

    def _next_iteration(self, tasks: dict[int, asyncio.Task[None]]) -> int:
        unfinished = [i for i in self.journal.unfinished_iterations() if i not in tasks]
        return unfinished[0] if unfinished else self.journal.next_iteration()

    def _launch(self, iteration: int) -> asyncio.Task[None]:
        """Journal the iteration's start now (numbers stay in journal order) and run it in
        the lowest free slot."""
        slot = self.flights.free()
        block = block_of(iteration, self.exploration.block_size)
        self.journal.append(iteration, Step.STARTED, {"block": block, "slot": slot})
        flight = self.flights.take(iteration, slot)
        return asyncio.create_task(self._fly(flight), name=f"iteration {iteration}")

    async def _fly(self, flight: Flight) -> None:
        try:
            with self._journal_faults(f"recording iteration {flight.iteration}"):
                await self._iteration(flight)
        finally:
            self.flights.release(flight.iteration)

    @contextlib.contextmanager
    def _journal_faults(self, doing: str) -> Iterator[None]:
        """A lost journal ends the run; a full disk pauses it until a human frees space
        (the iteration is re-entered then, never skipped)."""
        try:
            yield
        except JournalLost as exc:
            self.failure = str(exc)
            self.publish(ev.EngineError(self.failure))
        except (OSError, sqlite3.Error) as exc:
            if not disk_full(exc):
                raise
            self._pause(f"disk full while {doing} ({exc}); free some space, then "
                        f"`proctor resume {self.settings.name}`")

    async def _wait_for_change(self, tasks: dict[int, asyncio.Task[None]]) -> None:
        """Until an iteration ends or a command was acted on; a stopping run re-sends its
        stop to every slot until the runs have ended."""
        tick = asyncio.create_task(self._tick.wait())
        stopping = self._stop_reason is not None or self.failure is not None
        done, _ = await asyncio.wait({tick, *tasks.values()}, timeout=POLL_S if stopping else None,
                                     return_when=asyncio.FIRST_COMPLETED)
        tick.cancel()
        for iteration, task in list(tasks.items()):
            if task in done:
                del tasks[iteration]
                task.result()  # an unexpected error ends the run, as it always did
        if stopping:
            await self._stop_runs(tasks)

    async def _stop_runs(self, tasks: dict[int, asyncio.Task[None]]) -> None:
        for flight in list(self.flights):
            if flight.iteration in tasks and flight.phase in ("running", "ab"):
                await self.executor.stop(flight.slot)

    def _stop_condition(self, iteration: int) -> str | None:
        if self._stop_reason is not None:
            return self._stop_reason
        # a node a human asked for still runs after the last iteration
        beyond = self.flights.beyond(self.settings.iterations)
        if iteration > self.settings.iterations and len(self.state.human_queue) <= beyond:
            return f"completed {self.settings.iterations} iterations"
        hours = self.exploration.max_wall_hours
        if hours is not None and time.monotonic() - self._started_at > hours * 3600:
            return f"wall-time limit of {hours} h reached"
        target = self.exploration.target_r2
        best = self.tree.best_node()
        if target is not None and best is not None and best.r2 >= target:
            return f"target R2 {target} reached by node {best.id}"
        return None

    async def _reclaim_orphaned_runs(self) -> None:
        """Runs left going by a killed engine are ended (killed, or cancelled on the cluster)
        before anything else; their iterations are re-run under their own numbers."""
        for iteration, active in self.state.active_runs.items():
            record = active.get("record") if isinstance(active.get("record"), dict) else {}
            said = await self.executor.reclaim(record)
            if said:
                self.publish(ev.EngineError(said))
            self.state.set_active_run(iteration, None)

    async def _iteration(self, flight: Flight) -> None:
        iteration = flight.iteration
        if (iteration - 1) % self.exploration.block_size == 0:
            self.logs.snapshot_protocol(block_of(iteration, self.exploration.block_size),
                                        self.view.instructions())
        self.publish(ev.IterationStarted(iteration,
                                         block_of(iteration, self.exploration.block_size),
                                         self.settings.iterations, flight.slot))
        number = self._resume_attempt(iteration)
        rejections: list[str] = []
        repair: Repair | None = None
        invalid_tries = 0
        while True:
            flight.phase = "proposing"
            attempt = await self._proposal(flight, number, repair, rejections)
            if attempt is None:
                return
            flight.attempt = attempt
            number += 1  # the next attempt, if this one is refused, rejected or repaired
            try:
                attempt.prepared = self.checker.prepare(iteration, attempt.proposal,
                                                        attempt.human)
            except (ProposalRejected, VcsError) as exc:
                invalid_tries += 1
                self._refuse(attempt, exc, invalid_tries)
                if attempt.human is not None or invalid_tries > self.exploration.repair_attempts:
                    self._skip(iteration, attempt.number, f"invalid proposal: {exc}")
                    return
                repair = Repair(invalid_tries, self.exploration.repair_attempts,
                                attempt.proposal, str(exc))
                continue
            flight.phase = "review"
            decision = await self._review(attempt)
            if not decision.approved:
                if self._stop_reason is not None:
                    return
                rejections.append(decision.reason)
                repair = None
                continue
            flight.phase = "pending"
            await self._wait_while_paused()  # a pause holds an approved change too
            if self._stop_reason is not None:
                return
            try:
                if decision.files is not None:  # the human's edited version is what runs
                    attempt.prepared = self.checker.prepare(
                        iteration, attempt.proposal, attempt.human, edited=decision.files)
                node = self._apply(attempt)
            except (ProposalRejected, VcsError, OSError) as exc:
                self.publish(ev.EngineError(f"iteration {iteration}: {exc}"))
                self._skip(iteration, attempt.number, f"could not apply: {exc}")
                return
            flight.phase = "running"
            result = await self._run(attempt, node, flight.slot)
            if result.status is RunStatus.STOPPED:
                return
            node = self._finish_node(iteration, result)
            repair = self._repair_for(attempt, node, result)
            if repair is None:
                if self._needs_ab(node):
                    flight.phase = "ab"
                    if not await self._ab_test(node, flight.slot):
                        return  # stopped: the resume goes on with the test
                self._record(attempt, node, result)
                return

    def _needs_ab(self, node: Node) -> bool:
        """A code change that beat its parent, not tested yet, under `ab_seeds`."""
        if self.exploration.ab_seeds < 2 or not node.code_changed or node.parent_id is None:
            return False
        parent = self.tree.get(node.parent_id)
        return (node.status is NodeStatus.DONE and parent.finished and node.r2 > parent.r2
                and node.id not in ab_results(self.journal))

    async def _ab_test(self, node: Node, slot: int) -> bool:
        """Test the node's code against its parent's in its own slot; it may be a parent
        only once the test says it helped. False when the run stopped meanwhile."""
        self.tree.withheld.add(node.id)
        test = ABTest(self.journal, self.config, self.tree, self.code, node.id,
                      self.exploration.ab_seeds,
                      lambda text: self.publish(ev.LogLines(node.id, (f"[A/B] {text}",))))
        try:
            comparison = await test.run(self.executor, slot)
        except ABStopped:
            return False
        except EngineError as exc:  # too few seeds ran: the gain stays unconfirmed
            self.publish(ev.EngineError(str(exc)))
            return True
        if comparison.verdict == "helped":
            self.tree.withheld.discard(node.id)
        self.publish(ev.LogLines(node.id, (f"[A/B] node {node.id}: {comparison.summary()}",)))
        return True

    def _repair_for(self, attempt: Attempt, node: Node, result: RunResult) -> Repair | None:
        """A repair request when the agent's code change failed and repairs are left."""
        used = sum(1 for p in attempt_proposals(self.journal, attempt.iteration)
                   if p.strategy == Strategy.REPAIR)
        if (node.status is NodeStatus.DONE or attempt.human is not None
                or not node.code_changed or used >= self.exploration.repair_attempts
                or result.status is RunStatus.LOST):  # the machine failed, not the code
            return None
        error = result.error or result.status.value
        detail = f"{error}\n{result.traceback_tail or ''}".strip()
        return Repair(used + 1, self.exploration.repair_attempts, attempt.proposal, detail)

    def _refuse(self, attempt: Attempt, exc: Exception, tries: int) -> None:
        """An invalid proposal: journaled as a refused review; the agent hears why; a policy
        violation is also recorded."""
        review = review_of(attempt.iteration, attempt.number, attempt.proposal, attempt.human,
                           None, refused=exc)
        self.journal.append(attempt.iteration, Step.REVIEW, review.to_dict(),
                            attempt=attempt.number)
        self.publish(ev.ProposalInvalid(attempt.iteration, str(exc), tries))
        if review.policy_violation:
            self.state.record_policy_violation(attempt.iteration, attempt.number, str(exc),
                                               time.time())
            self.publish(ev.PolicyViolation(attempt.iteration, str(exc)))

    def _resume_attempt(self, iteration: int) -> int:
        events = [e for e in self.journal.events(iteration) if e.step != "agent_exchange"]
        return max((e.attempt for e in events), default=0)

    # -- propose ----------------------------------------------------------------------------

    async def _proposal(self, flight: Flight, number: int, repair: Repair | None,
                        rejections: list[str]) -> Attempt | None:
        iteration = flight.iteration
        stored = self.journal.payload(iteration, Step.PROPOSAL_STORED, number)
        if stored is not None:
            human = HumanChange.from_dict(stored["human"]) if stored.get("human") else None
            if human is not None:
                self.humans.dequeue(human.request_id)  # a crash may have left it queued
            return Attempt(iteration, number, Proposal.model_validate(stored["proposal"]), human)
        assert self._agent_turn is not None
        async with self._agent_turn:  # one proposal at a time, each seeing the others
            if self._paused_reason() is not None or self._stop_reason is not None:
                return None  # re-entered after the resume
            return await self._propose(flight, number, repair, rejections)

    async def _propose(self, flight: Flight, number: int, repair: Repair | None,
                       rejections: list[str]) -> Attempt | None:
        iteration = flight.iteration
        queue = self.humans.queue()
        if number == 0 and queue:
            human = queue[0]
            proposal = human.proposal()
            self.logs.append_reasoning(iteration, f"{human.title} (asked by a human)",
                                       attempt=number)
            self.journal.append(iteration, Step.PROPOSAL_STORED,
                                {"proposal": proposal.model_dump(mode="json"), "cost_usd": 0.0,
                                 "human": human.to_dict()}, attempt=number)
            self.humans.dequeue(human.request_id)
            self.records.flush_analysis(next_parent=proposal.parent_id, analysis="")
            return Attempt(iteration, number, proposal, human)
        context = self.view.context(iteration, number, repair, rejections, slot=flight.slot,
                                    slots=self.slots, role=flight.role,
                                    in_flight=self.flights.others(flight))
        try:
            reply = await self.agent.propose(context)
        except AgentPaused as exc:  # spend limit, budget cap, API unreachable: wait for a human
            self._pause(exc.reason)
            return None
        except Exception as exc:  # an agent failure skips the iteration, never the run
            self._skip(iteration, number, f"agent failed: {type(exc).__name__}: {exc}")
            return None
        proposal = reply.proposal
        self.logs.append_reasoning(iteration, reply.reasoning or proposal.analysis,
                                   attempt=number)
        self.journal.append(iteration, Step.PROPOSAL_STORED,
                            {"proposal": proposal.model_dump(mode="json"),
                             "cost_usd": reply.cost_usd}, attempt=number)
        if reply.cost_usd:
            total = self.state.agent_spent_usd
            self.publish(ev.AgentCost(iteration, reply.cost_usd, total or reply.cost_usd))
        self.records.flush_analysis(next_parent=proposal.parent_id, analysis=proposal.analysis)
        return Attempt(iteration, number, proposal, None)

    def _files_at(self, node_id: int | None) -> dict[str, str]:
        return self.code.files_at_commit(self.tree.commit_of(node_id, self.lineage.base))

    # -- review -----------------------------------------------------------------------------

    async def _review(self, attempt: Attempt) -> Decision:
        """Journal the prepared review, wait for a human when the policy says so, and journal
        the decision."""
        iteration, number = attempt.iteration, attempt.number
        waiting = needs_review(self.settings.approval, attempt.proposal, attempt.human)
        stored = self.journal.payload(iteration, Step.DECISION, number)
        journaled = self.journal.payload(iteration, Step.REVIEW, number)
        if journaled is None:
            review = review_of(iteration, number, attempt.proposal, attempt.human,
                               attempt.prepared, awaiting=waiting)
            if stored is None:  # a run journaled before reviews were: its decision stands
                self.journal.append(iteration, Step.REVIEW, review.to_dict(), attempt=number)
            journaled = review.to_dict()
        attempt.review = Review.from_dict(journaled)
        if stored is not None:
            return Decision.from_dict(stored)
        # the diff is readable by any viewer before the decision, not only once applied
        self.logs.write_change(iteration, attempt.review.diff, attempt.review.config_diff)
        # decided while no engine ran: no need to wait, nor to say so
        decided = attempt.review.proposal_id in self._early
        self.publish(ev.ProposalReady(iteration, attempt.proposal, attempt.review.diff,
                                      attempt.review.config_diff, waiting and not decided,
                                      attempt.review.proposal_id))
        decision = Decision(True, by="human" if attempt.human is not None else "policy")
        if waiting:
            decision = await self._await_decision(attempt)
            if decision.by == "stop":
                return decision
        self.journal.append(iteration, Step.DECISION, decision.to_dict(), attempt=number)
        reason = "edited by the human before approval" if decision.files is not None \
            else decision.reason
        self.publish(ev.ProposalDecided(iteration, decision.approved, reason, decision.by,
                                        attempt.review.proposal_id))
        return decision

    async def _await_decision(self, attempt: Attempt) -> Decision:
        assert attempt.review is not None
        proposal_id = attempt.review.proposal_id
        self._reviewing[proposal_id] = attempt
        early = self._early.pop(proposal_id, None)
        if early is not None:
            self._decide(early)
        if not any(a.review is not None and a.review.files for a in self._reviewing.values()
                   if a is not attempt):
            self.state.stale_proposal = None
        for edit in self.manual.pending():  # a human edit already waiting on those files
            self._mark_stale(edit.path)
        try:
            await self._until(lambda: attempt.decision is not None)
            if attempt.decision is None:
                return Decision(False, self._stop_reason or "stopped", "stop")
            return attempt.decision
        finally:
            del self._reviewing[proposal_id]
            stale = self.state.stale_proposal
            if stale is not None and stale.get("iteration") == attempt.iteration:
                self.state.stale_proposal = None

    # -- apply, run, record -----------------------------------------------------------------

    def _apply(self, attempt: Attempt) -> Node:
        """Commit the node's code (if it changed), write its diff, add it to the tree."""
        iteration, number = attempt.iteration, attempt.number
        stored = self.journal.payload(iteration, Step.APPLIED, number)
        if stored is not None:
            node = Node.from_dict(stored["node"])
            self.tree.put(node)
            self.view.forget(node.id)
            return node
        node = attempt.node
        parent_commit = self.tree.commit_of(node.parent_id, self.lineage.base)
        if node.code_changed:
            node = replace(node, commit=self.commits.commit(attempt, parent_commit))
            self.publish(ev.CodeCommitted(iteration, node.commit or ""))
        else:
            node = replace(node, commit=parent_commit)
        assert attempt.prepared is not None
        if attempt.edited:  # the review wrote the proposal's diff; the human's replaces it
            self.logs.write_change(iteration, attempt.prepared.diff,
                                   attempt.prepared.config_diff)
        if attempt.proposal.memory:
            self.records.memory_rewritten(attempt.proposal.memory, iteration)
        self.tree.put(node)
        self.view.forget(node.id)
        self.journal.append(iteration, Step.APPLIED, {"node": node.to_dict()}, attempt=number)
        if attempt.human is not None and attempt.human.kind == REVERT:
            self.publish(ev.NodeReverted(iteration, attempt.human.reverted_id or 0, node.commit))
        return node

    async def _run(self, attempt: Attempt, node: Node, slot: int) -> RunResult:
        iteration, number = attempt.iteration, attempt.number
        stored = self.journal.payload(iteration, Step.RUN_FINISHED, number)
        if stored is not None:
            return RunResult.from_dict(stored["result"])
        self.paths.node_dir(iteration).mkdir(parents=True, exist_ok=True)
        commit = node.commit or self.tree.commit_of(node.parent_id, self.lineage.base)
        if self._watcher is not None:  # an edit not reported yet must not vanish in the rebuild
            self._watcher.check_now(WORKSPACE)
        self.manual.expect_workspace(node.id, self.code.files_at_commit(commit))
        self.code.materialise(commit, self.paths.workspace)  # the humans' view of it
        config_path = self.logs.write_config_snapshot(iteration, node.config | {
            "exploration": self.exploration.model_dump(mode="json")})
        self.tree.update(iteration, status=NodeStatus.RUNNING)
        placed_before = False

        def placed(placement: Placement) -> None:  # once per step of a local run
            nonlocal placed_before
            where = {"slot": placement.slot, "where": placement.where,
                     "record": placement.record}
            self.state.set_active_run(iteration, where)
            if not placed_before:
                placed_before = True
                self.journal.append(iteration, Step.RUN_STARTED, {**where, "pid": placement.pid},
                                    attempt=number)
                self.publish(ev.TrainingStarted(iteration, node.id, node.parent_id,
                                                node.mutation, placement.pid, placement.slot,
                                                placement.where))

        def output(lines: list[str]) -> None:
            self.publish(ev.LogLines(iteration, tuple(lines)))
            progress = latest_progress(iteration, lines)
            if progress is not None:
                self.publish(progress)

        if self._stop_reason is not None:
            return RunResult(RunStatus.STOPPED, None, None, {}, {}, self._stop_reason, "", 0.0,
                             None, False)
        job = NodeJob(iteration, number, lambda folder: self.code.materialise(commit, folder),
                      config_path.read_text(encoding="utf-8"),
                      self.exploration.seed, self.paths.training_log(iteration))
        try:
            result = await self.executor.run(slot, job, on_output=output, on_placed=placed)
        finally:
            with contextlib.suppress(OSError, sqlite3.Error):
                self.state.set_active_run(iteration, None)
        if result.status is not RunStatus.STOPPED:
            self.journal.append(iteration, Step.RUN_FINISHED, {"result": result.to_dict()},
                                attempt=number)
        return result

    def _finish_node(self, iteration: int, result: RunResult) -> Node:
        status = status_after_run(result.status)
        self.tree.update(iteration, status=status, metrics=dict(result.metrics))
        finished = self.tree.get(iteration)
        self.logs.write_metrics(finished, result.error, run=result.to_dict())
        best = self.tree.best_node()
        warning = self.commits.move_best(best.commit if best is not None else None)
        if warning:
            self.publish(ev.EngineError(warning))
        self.publish(ev.NodeFinished(
            iteration, iteration, str(status), dict(result.metrics), result.error,
            best.metrics.get("final_r2") if best else None,
        ))
        return finished

    def _record(self, attempt: Attempt, node: Node, result: RunResult) -> None:
        self.records.node_finished(node, attempt.proposal, attempt.human is None, result)
        self.journal.append(attempt.iteration, Step.RECORDED, {"node": node.to_dict()},
                            attempt=attempt.number)
        if attempt.iteration % self.exploration.block_size == 0:  # as the original did
            self._draw_tree(block_of(attempt.iteration, self.exploration.block_size))

    def _draw_tree(self, block: int) -> None:
        """The block's tree picture, drawn by a child process (`engine.tree_picture`): a
        second of matplotlib holds the GIL, which the other slots' runs and commands must not
        wait for. The run's shutdown waits for the drawer (the last picture) or kills it."""
        if self._drawings:  # skipped: one drawer at a time, and the next picture has it all
            return
        drawing = asyncio.create_task(draw_tree_picture(
            self.run_dir, block * self.exploration.block_size, self.paths.tree_picture(block)))
        self._drawings.add(drawing)

        def drawn(task: asyncio.Task[str | None]) -> None:
            self._drawings.discard(task)
            why = None if task.cancelled() or task.exception() else task.result()
            if why is not None:
                self.publish(ev.EngineError(f"the tree picture of block {block}: {why}"))

        drawing.add_done_callback(drawn)

    def _skip(self, iteration: int, number: int, reason: str) -> None:
        self.journal.append(iteration, Step.RECORDED, {"node": None, "skipped": reason},
                            attempt=number)
        self.publish(ev.IterationSkipped(iteration, reason))
