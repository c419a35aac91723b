"""Human edits (FAULTS 22): the watcher, stale proposals, adopting and ignoring manual edits,
and approving a proposal the human edited. Real engine, real files, real git; every wait is
on an event with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from git_project import git, make_git_project
from scripted_agent import ScriptedAgent

from engine import events as ev
from engine.config import load_config
from engine.journal import Journal
from engine.loop import Engine
from engine.runs import RunSettings
from engine.state import MANUAL_EDITS, STALE_PROPOSAL
from engine.watch import CHECKOUT, WORKSPACE, ManualEdits

DEADLINE_S = 10.0


class Recorder:
    """Collects published events; `wait_for` blocks on a condition, with a deadline."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []
        self._changed = asyncio.Event()

    def __call__(self, event: ev.Event) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, wanted: Callable[[ev.Event], bool],
                       timeout: float = DEADLINE_S) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            found = next((e for e in self.events if wanted(e)), None)
            if found is not None:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                kinds = [type(e).__name__ for e in self.events[-15:]]
                raise AssertionError(f"no such event within {timeout} s; last: {kinds}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_git_project(tmp_path / "project")


@contextlib.asynccontextmanager
async def running(project: Path, iterations: int, approval: str, agent=None,
                  watch: bool = True, name: str = "r1"):
    """An engine running as a task; stopped and closed however the test ends."""
    recorder = Recorder()
    config = load_config(project / "configs" / "fake.yaml")
    settings = RunSettings(name=name, config_path="fake.yaml", iterations=iterations,
                           approval=approval, agent="scripted", runner="subprocess",
                           watch_edits=watch)
    engine = Engine.create(project, config, settings, agent or ScriptedAgent(), recorder)
    task = asyncio.create_task(engine.run())
    try:
        yield engine, task, recorder
    finally:
        if not task.done():
            engine.submit(ev.Stop("test over"))
        try:
            await asyncio.wait_for(task, 30)
        finally:
            engine.close()


def awaiting(iteration: int) -> Callable[[ev.Event], bool]:
    return lambda e: isinstance(e, ev.ProposalReady) and e.iteration == iteration \
        and e.awaiting_review


# -- the bookkeeping ------------------------------------------------------------------------


class DictStore:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def state(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set_state(self, key: str, value: Any) -> None:
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value


def test_manual_edits_are_judged_by_content_and_kept_in_the_store():
    store = DictStore()
    book = ManualEdits(store, ["models/siren.py"])
    book.remember_checkout({"models/siren.py": "A = 1\n"})
    assert book.observe(CHECKOUT, "models/siren.py", "A = 1\n") is None  # not an edit
    edit = book.observe(CHECKOUT, "models/siren.py", "A = 2\n")
    assert edit is not None and "+A = 2" in edit.diff and "-A = 1" in edit.diff
    assert book.observe(CHECKOUT, "models/siren.py", "A = 2\n") is None  # already known
    assert ManualEdits(store, ["models/siren.py"]).pending() == [edit]  # survives a restart
    assert book.observe(CHECKOUT, "models/siren.py", "A = 1\n") is None  # undone by the human
    assert book.pending() == []
    book.observe(CHECKOUT, "models/siren.py", "A = 3\n")
    assert [e.after for e in book.resolve()] == ["A = 3\n"]
    assert book.observe(CHECKOUT, "models/siren.py", "A = 3\n") is None  # resolved: new normal
    book.expect_workspace(4, {"models/siren.py": "A = 1\n"})
    assert book.observe(WORKSPACE, "models/siren.py", "A = 9\n").node_id == 4


# -- through the engine ---------------------------------------------------------------------


async def test_human_edit_while_a_proposal_is_pending_marks_it_stale(project):
    siren = project / "models" / "siren.py"
    async with running(project, 3, "code") as (engine, task, recorder):
        proposal = await recorder.wait_for(awaiting(3))  # the scripted agent edits siren.py
        assert "models/siren.py" in proposal.diff
        siren.write_text(siren.read_text().replace("BONUS = 0.0", "BONUS = 0.5"))
        detected = await recorder.wait_for(
            lambda e: isinstance(e, ev.ManualEditDetected) and "+BONUS = 0.5" in e.diff)
        assert (detected.path, detected.where) == ("models/siren.py", CHECKOUT)
        stale = await recorder.wait_for(lambda e: isinstance(e, ev.ProposalStale))
        assert (stale.iteration, stale.path) == (3, "models/siren.py")
        with Journal.open_for_client(project / "log" / "r1") as client:
            assert client.state(STALE_PROPOSAL) == {"iteration": 3, "paths": ["models/siren.py"]}
            assert client.state(MANUAL_EDITS)[0]["after"].endswith("BONUS = 0.5\n")
        engine.submit(ev.IgnoreManualEdit("models/siren.py"))
        engine.submit(ev.Approve(proposal.proposal_id))
        await asyncio.wait_for(task, 30)
    # neither side was overwritten: node 3 ran the agent's code, the checkout keeps the human's
    assert "BONUS = 0.01" in git(project, "show", f"{engine.tree.get(3).commit}:models/siren.py")
    assert "BONUS = 0.5" in siren.read_text()
    resolved = recorder.of(ev.ManualEditResolved)
    assert [(r.path, r.adopted) for r in resolved] == [("models/siren.py", False)]
    with Journal.open_for_client(project / "log" / "r1") as client:
        assert client.state(MANUAL_EDITS) is None and client.state(STALE_PROPOSAL) is None


async def test_adopting_a_checkout_edit_makes_a_human_node(project):
    trainer = project / "models" / "trainer.py"
    async with running(project, 3, "code") as (engine, task, recorder):
        proposal = await recorder.wait_for(awaiting(3))
        trainer.write_text(trainer.read_text().replace("return 0.9 -", "return 0.95 -"))
        await recorder.wait_for(
            lambda e: isinstance(e, ev.ManualEditDetected) and "0.95" in e.diff)
        assert not recorder.of(ev.ProposalStale)  # another file than the proposal's
        engine.submit(ev.AdoptManualEdit())
        engine.submit(ev.Approve(proposal.proposal_id))
        await asyncio.wait_for(task, 60)
    node4 = engine.tree.get(4)  # a human's node runs even after the last iteration
    assert (node4.author, node4.strategy, node4.code_changed) == ("human", "manual-edit", True)
    parent = engine.tree.get(node4.parent_id)
    assert node4.metrics["final_r2"] == pytest.approx(parent.metrics["final_r2"] + 0.05)
    subject = git(project, "log", "-1", "--format=%s", node4.commit)
    assert subject == "[Iter 4] manual edit (models/trainer.py)"
    assert git(project, "log", "-1", "--format=%an", node4.commit) == "Test Human"
    assert git(project, "rev-parse", f"{node4.commit}^") == parent.commit
    assert [(r.path, r.adopted) for r in recorder.of(ev.ManualEditResolved)] == [
        ("models/trainer.py", True)]


async def test_an_edit_of_the_workspace_during_a_run_is_detected_and_adoptable(project):
    config = project / "configs" / "fake.yaml"
    config.write_text(config.read_text().replace("steps: 3", "steps: 20\n  step_sleep: 0.03"))
    git(project, "commit", "-q", "-am", "slower training")
    workspace_siren = project / "log" / "r1" / "workspace" / "models" / "siren.py"
    async with running(project, 2, "all") as (engine, task, recorder):
        first = await recorder.wait_for(awaiting(1))
        engine.submit(ev.Approve(first.proposal_id))
        # a step printed: the harness has imported the node's code by now
        await recorder.wait_for(lambda e: isinstance(e, ev.TrainingProgress))
        workspace_siren.write_text(workspace_siren.read_text().replace("0.0", "0.07"))
        detected = await recorder.wait_for(lambda e: isinstance(e, ev.ManualEditDetected))
        assert (detected.where, detected.path) == (WORKSPACE, "models/siren.py")
        second = await recorder.wait_for(awaiting(2))
        engine.submit(ev.AdoptManualEdit("models/siren.py"))
        engine.submit(ev.Approve(second.proposal_id))
        await asyncio.wait_for(task, 60)
    node3 = engine.tree.get(3)
    assert (node3.parent_id, node3.author) == (1, "human")  # built on the workspace's node
    assert node3.metrics["final_r2"] == pytest.approx(
        engine.tree.get(1).metrics["final_r2"] + 0.07)


async def test_an_edit_made_while_no_engine_ran_is_found_at_start(project):
    async with running(project, 1, "auto") as (engine, task, _):
        await asyncio.wait_for(task, 60)
    siren = project / "models" / "siren.py"
    siren.write_text(siren.read_text().replace("0.0", "0.02"))
    run_dir = project / "log" / "r1"
    with Journal.open_for_client(run_dir) as client:
        client.post_command("AdoptManualEdit", {"path": None})
    recorder = Recorder()
    resumed = Engine.reopen(run_dir, lambda c, s: ScriptedAgent(), recorder, iterations=1)
    try:
        await asyncio.wait_for(resumed.run(), 60)
    finally:
        resumed.close()
    assert recorder.of(ev.ManualEditDetected)[0].where == CHECKOUT
    node2 = resumed.tree.get(2)
    assert (node2.parent_id, node2.strategy) == (1, "manual-edit")
    assert node2.metrics["final_r2"] == pytest.approx(
        resumed.tree.get(1).metrics["final_r2"] + 0.02)


async def test_an_edited_version_is_validated_then_becomes_the_nodes_code(project):
    async with running(project, 3, "code", watch=False) as (engine, task, recorder):
        proposal = await recorder.wait_for(awaiting(3))
        parent = proposal.proposal.parent_id
        files = {path: engine.code.files_at_commit(engine.tree.get(parent).commit)[path]
                 for path in ("models/siren.py",)}
        engine.submit(ev.ApproveEdited(proposal.proposal_id, {"models/siren.py": "BONUS = (\n"}))
        invalid = await recorder.wait_for(lambda e: isinstance(e, ev.EditedVersionInvalid))
        assert "does not parse" in invalid.error
        engine.submit(ev.ApproveEdited(proposal.proposal_id, {"models/harness.py": "x = 1\n"}))
        await recorder.wait_for(lambda e: isinstance(e, ev.EditedVersionInvalid)
                                and "not an editable file" in e.error)
        edited = files["models/siren.py"].replace("BONUS = 0.0", "BONUS = 0.04")
        engine.submit(ev.ApproveEdited(proposal.proposal_id, {"models/siren.py": edited}))
        await asyncio.wait_for(task, 60)
    decided = [e for e in recorder.of(ev.ProposalDecided) if e.iteration == 3]
    assert [(d.approved, d.by) for d in decided] == [(True, "human")]
    node3 = engine.tree.get(3)
    assert node3.metrics["final_r2"] == pytest.approx(
        engine.tree.get(parent).metrics["final_r2"] + 0.04)
    assert "BONUS = 0.04" in git(project, "show", f"{node3.commit}:models/siren.py")
    message = git(project, "log", "-1", "--format=%B", node3.commit)
    assert "edited by a human" in message
    diff = (project / "log" / "r1" / "nodes" / "003" / "change.diff").read_text()
    assert "+BONUS = 0.04" in diff
    with Journal.open_for_client(project / "log" / "r1") as client:
        decision = client.payload(3, "decision")
    assert decision["edited"] is True and decision["by"] == "human"


async def test_the_watcher_can_be_switched_off(project):
    seen_tasks: list[set[str]] = []

    class Looks(ScriptedAgent):
        async def propose(self, context):
            seen_tasks.append({task.get_name() for task in asyncio.all_tasks()})
            return await super().propose(context)

    async with running(project, 1, "auto", Looks(), watch=False) as (_, task, _):
        await asyncio.wait_for(task, 60)
    async with running(project, 1, "auto", Looks(), name="r2") as (_, task, _):
        await asyncio.wait_for(task, 60)
    assert not any(name.startswith("watch-") for name in seen_tasks[0])
    assert {"watch-checkout", "watch-workspace"} <= seen_tasks[1]


async def test_proposal_diff_is_on_disk_before_the_decision(project):
    async with running(project, 3, "code", watch=False) as (engine, task, recorder):
        ready = await recorder.wait_for(awaiting(3))
        change = project / "log" / "r1" / "nodes" / "003" / "change.diff"
        assert change.read_text() == ready.diff
        engine.submit(ev.Reject(ready.proposal_id, "not now"))
        engine.submit(ev.Stop())
