"""k slots in flight on one machine: the loop end to end on the fake experiment, with real
runner processes, a real journal and a real git repository."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import yaml
from git_project import make_git_project
from scripted_agent import ScriptedAgent
from waiting import wait_for

from engine import events as ev
from engine.agents.base import AgentContext, AgentReply
from engine.config import load_config
from engine.evaluation import EvaluationPlan
from engine.executors import LocalExecutor
from engine.journal import Journal, Step
from engine.loop import Engine
from engine.proposal import CodeChange, CodeEdit, Proposal, Strategy
from engine.review import waiting_reviews
from engine.runner import RunStatus, make_runner
from engine.runner.isolation import is_running
from engine.runs import RunSettings, create_run
from engine.state import RunState

HERE = Path(__file__).resolve().parent


def slotted_project(root: Path, slots: int = 2, step_sleep: float = 0.2, **exploration) -> Path:
    """The fake project with `parallel: slots` and runs long enough to overlap."""
    project = make_git_project(root)
    config_path = project / "configs" / "fake.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["exploration"].update(parallel=slots, **exploration)
    config["training"]["step_sleep"] = step_sleep
    config_path.write_text(yaml.safe_dump(config))
    return project


def settings(root: Path, iterations: int, approval: str = "auto", name: str = "r1"):
    return RunSettings(name=name, config_path=str(root / "configs" / "fake.yaml"),
                       iterations=iterations, approval=approval, agent="scripted",
                       runner="subprocess")


def intervals(journal: Journal) -> dict[int, tuple[float, float]]:
    """Each iteration's run, from its journaled start to its journaled end."""
    started = {e.iteration: e.created_at for e in journal.events() if e.step == Step.RUN_STARTED}
    ended = {e.iteration: e.created_at for e in journal.events()
             if e.step == Step.RUN_FINISHED}
    return {i: (started[i], ended[i]) for i in started if i in ended}


def overlapping(spans: dict[int, tuple[float, float]]) -> bool:
    ordered = sorted(spans.values())
    return any(later[0] < earlier[1] for earlier, later in zip(ordered, ordered[1:],
                                                               strict=False))


class ConfigAgent(ScriptedAgent):
    """Config-only proposals: each slot steps the learning rate of the best candidate."""

    async def propose(self, context: AgentContext) -> AgentReply:
        self.contexts.append(context)
        if not context.candidates:
            return AgentReply(Proposal(parent_id=None, strategy=Strategy.BASELINE,
                                       analysis="first"), "baseline")
        parent = context.node(context.candidates[0])
        rate = parent.config["training"]["learning_rate"] * (2 + context.iteration)
        return AgentReply(Proposal(parent_id=parent.id, strategy=Strategy.EXPLOIT,
                                   config_changes={"training.learning_rate": min(rate, 0.1)},
                                   analysis="step"), f"slot {context.slot}")


async def run_engine(project: Path, agent, iterations: int, approval: str = "auto",
                     on_event=None) -> tuple[Engine, list[ev.Event]]:
    seen: list[ev.Event] = []

    def publish(event: ev.Event) -> None:
        seen.append(event)
        if on_event is not None:
            on_event(engine, event)

    config = load_config(project / "configs" / "fake.yaml")
    engine = Engine.create(project, config, settings(project, iterations, approval), agent,
                           publish)
    try:
        await engine.run()
    finally:
        engine.close()
    return engine, seen


async def test_two_slots_run_six_iterations_concurrently_numbered_in_journal_order(tmp_path):
    project = slotted_project(tmp_path / "project")
    agent = ConfigAgent()
    engine, seen = await run_engine(project, agent, iterations=6)
    journal = Journal.open_for_client(engine.run_dir)
    try:
        assert journal.completed_iterations() == [1, 2, 3, 4, 5, 6]
        assert journal.unfinished_iterations() == []
        started = [e.iteration for e in journal.events() if e.step == Step.STARTED]
        assert started == [1, 2, 3, 4, 5, 6]  # unique, contiguous, in journal order
        slots = {e.iteration: e.payload["slot"] for e in journal.events()
                 if e.step == Step.RUN_STARTED}
        assert set(slots.values()) == {1, 2}
        assert overlapping(intervals(journal))
        assert RunState(journal).active_runs == {}
    finally:
        journal.close()
    assert [node.id for node in engine.tree] == [1, 2, 3, 4, 5, 6]
    assert all(node.finished for node in engine.tree)
    # the agent saw the other slot's proposal while it chose
    assert any(context.in_flight for context in agent.contexts)
    assert {context.slots for context in agent.contexts} == {2}
    opened = next(e for e in seen if isinstance(e, ev.RunOpened))
    assert opened.slots == ("local slot 1", "local slot 2")
    trainings = [e for e in seen if isinstance(e, ev.TrainingStarted)]
    assert {e.slot for e in trainings} == {1, 2}
    assert all(e.where.startswith("local slot") for e in trainings)
    analysis = (engine.run_dir / "analysis.md").read_text()
    for iteration in range(1, 7):  # one entry per node, in the format users know
        assert analysis.count(f"## Iter {iteration}:") == 1
    scores = (engine.run_dir / "ucb_scores.txt").read_text()
    assert scores.startswith("=== UCB Scores (Block")


class CodeThenConfigAgent(ScriptedAgent):
    """Iteration 2 is a code change (it waits for review under `approval: code`); every
    other iteration is a config change that needs none."""

    async def propose(self, context: AgentContext) -> AgentReply:
        self.contexts.append(context)
        if context.iteration == 2:
            current = context.read_file(None, "models/siren.py")
            line = next(x for x in current.splitlines() if x.startswith("BONUS"))
            return AgentReply(Proposal(
                parent_id=None, strategy=Strategy.CODE_CHANGE,
                edits=(CodeEdit(file="models/siren.py", search=line, replace="BONUS = 0.5"),),
                code_change=CodeChange(file="models/siren.py", function="module",
                                       change="set BONUS"),
                mutation="[code] bonus", analysis="code"), "code")
        return AgentReply(Proposal(parent_id=None, strategy=Strategy.EXPLORE,
                                   config_changes={"training.learning_rate":
                                                   1e-4 * context.iteration},
                                   analysis="config"), "config")


async def test_a_review_holds_only_its_own_slot(tmp_path):
    project = slotted_project(tmp_path / "project", step_sleep=0.0)
    finished_while_waiting: list[int] = []

    def on_event(engine: Engine, event: ev.Event) -> None:
        if isinstance(event, ev.NodeFinished):
            pending = [a for a in engine._reviewing.values() if a.decision is None]
            if pending:
                finished_while_waiting.append(event.iteration)
                if len(finished_while_waiting) == 2:  # the other slot went on: now approve
                    engine.submit(ev.Approve(pending[0].review.proposal_id))

    engine, seen = await run_engine(project, CodeThenConfigAgent(), iterations=4,
                                    approval="code", on_event=on_event)
    assert finished_while_waiting[:2] == [1, 3]
    assert [node.id for node in engine.tree] == [1, 2, 3, 4]
    assert engine.tree.get(2).code_changed and engine.tree.get(2).finished


async def test_several_reviews_wait_at_once_each_decided_by_its_own_id(tmp_path):
    project = slotted_project(tmp_path / "project", step_sleep=0.0)

    class AlwaysCode(CodeThenConfigAgent):
        async def propose(self, context):
            reply = await super().propose(context.__class__(
                **{**context.__dict__, "iteration": 2}))
            return reply

    decided: list[str] = []

    def on_event(engine: Engine, event: ev.Event) -> None:
        if isinstance(event, ev.ProposalReady) and event.awaiting_review:
            journal = engine.journal
            waiting = waiting_reviews(journal)
            if len(waiting) == 2:  # both slots wait: decide the newer first
                for review in reversed(waiting):
                    decided.append(review.proposal_id)
                    engine.submit(ev.Approve(review.proposal_id))
            elif event.iteration > 2:
                engine.submit(ev.Approve(event.proposal_id))

    engine, _ = await run_engine(project, AlwaysCode(), iterations=2, approval="code",
                                 on_event=on_event)
    assert len(decided) == 2
    assert [node.id for node in engine.tree] == [1, 2]
    assert all(node.code_changed and node.finished for node in engine.tree)


class CrashingSlotAgent(ConfigAgent):
    """Iteration 2's code change makes training raise; the others are config changes."""

    async def propose(self, context: AgentContext) -> AgentReply:
        if context.iteration != 2:
            return await super().propose(context)
        self.contexts.append(context)
        current = context.read_file(None, "models/trainer.py")
        first = current.splitlines()[0]
        return AgentReply(Proposal(
            parent_id=None, strategy=Strategy.CODE_CHANGE,
            edits=(CodeEdit(file="models/trainer.py", search=first,
                            replace=first + "\nraise RuntimeError('slot 2 breaks')"),),
            code_change=CodeChange(file="models/trainer.py", function="module",
                                   change="break training"),
            mutation="[code] break", analysis="crash"), "crash")


async def test_a_crash_in_one_slot_leaves_the_other_untouched(tmp_path):
    project = slotted_project(tmp_path / "project", repair_attempts=0)
    engine, seen = await run_engine(project, CrashingSlotAgent(), iterations=4)
    crashed = engine.tree.get(2)
    assert crashed.status == "failed"
    others = [engine.tree.get(i) for i in (1, 3, 4)]
    assert all(node.status == "done" for node in others)
    finished = [e for e in seen if isinstance(e, ev.NodeFinished)]
    assert sorted(e.iteration for e in finished) == [1, 2, 3, 4]
    assert "slot 2 breaks" in engine.paths.training_log(2).read_text()
    assert "slot 2 breaks" not in engine.paths.training_log(1).read_text()


def driver(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "loop_driver.py"), str(project), "r1",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_kill_9_with_two_runs_in_flight_then_resume_reruns_each_under_its_number(tmp_path):
    project = slotted_project(tmp_path / "project", step_sleep=0.1)
    config = yaml.safe_load((project / "configs" / "fake.yaml").read_text())
    config["training"]["steps"] = 40  # long enough to be killed mid-run
    (project / "configs" / "fake.yaml").write_text(yaml.safe_dump(config))
    run_dir = project / "log" / "r1"
    engine = driver(project, "4")
    journal = None
    try:
        wait_for(lambda: (run_dir / "vcs.yaml").exists(), "the run folder", 60)
        journal = Journal.open_for_client(run_dir)
        wait_for(lambda: len(RunState(journal).active_runs) == 2, "two runs in flight", 60)
        in_flight = RunState(journal).active_runs
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        assert sorted(in_flight) == [1, 2]
        leaders = [(run["record"]["pid"], run["record"]["start_time"])
                   for run in in_flight.values()]
        assert any(is_running(pid, start) for pid, start in leaders)  # orphans left going
        journal.close()
        journal = None
        resumed = driver(project, "4", "resume")
        output, _ = resumed.communicate(timeout=240)
        assert resumed.returncode == 0, output.decode()
        assert not any(is_running(pid, start) for pid, start in leaders)
        journal = Journal.open_for_client(run_dir)
        assert journal.completed_iterations() == [1, 2, 3, 4]
        started = [e.iteration for e in journal.events() if e.step == Step.STARTED]
        assert started == [1, 2, 3, 4]
        for iteration in (1, 2):  # re-run under its own number, recorded once
            recorded = [e for e in journal.events(iteration) if e.step == Step.RECORDED]
            assert len(recorded) == 1
            assert recorded[0].payload["node"]["status"] == "done"
        assert RunState(journal).active_runs == {}
    finally:
        if journal is not None:
            journal.close()
        if engine.poll() is None:
            os.kill(engine.pid, signal.SIGKILL)


class LosingExecutor(LocalExecutor):
    """Iteration 2's machine goes away mid-run (as a Dask worker can)."""

    async def run(self, slot, job, *, on_output=None, on_placed=None):
        result = await super().run(slot, job, on_output=on_output, on_placed=on_placed)
        if job.iteration == 2:
            return replace(result, status=RunStatus.LOST, metrics={},
                           error="the worker tcp://10.0.0.9:4000 was lost (sent 2 times)")
        return result


async def test_a_run_whose_machine_was_lost_is_not_blamed_on_its_code(tmp_path):
    project = slotted_project(tmp_path / "project", step_sleep=0.0, repair_attempts=1)
    config = load_config(project / "configs" / "fake.yaml")
    agent = CrashingSlotAgent()  # iteration 2 is a code change
    executor = LosingExecutor(2, EvaluationPlan.of(config.exploration, project),
                              project / "log" / "r1" / "sandbox",
                              lambda: make_runner("subprocess"), gpus=[])
    engine = Engine(create_run(project, config, settings(project, 3), lambda event: None),
                    agent, executor=executor)
    try:
        await engine.run()
    finally:
        engine.close()
    lost = engine.tree.get(2)
    assert lost.status == "failed" and lost.code_changed
    assert not any(context.repair for context in agent.contexts)  # no repair of sound code
    memory = (engine.run_dir / "memory.md").read_text()
    assert "node 2:" not in memory  # no do-not-retry note either
    assert "was lost" in (engine.paths.metrics(2)).read_text()
