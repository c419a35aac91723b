"""The engine's loop end to end on a fast fake experiment: real runner processes, real
journal, real files. The scripted agent decides; everything else is the production path."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from git_project import FAKE, UserState, copy_fake, git, make_git_project
from scripted_agent import ScriptedAgent

from engine import events as ev
from engine.config import load_config
from engine.journal import Journal, RunLockedError, Step
from engine.loop import Engine
from engine.review import find_review, waiting_review
from engine.runs import RunSettings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_git_project(tmp_path / "project")


@pytest.fixture
def plain_project(tmp_path: Path) -> Path:
    """The fake project outside any git repository (proctor keeps a private one)."""
    return copy_fake(tmp_path / "project")


def settings(root: Path, name: str = "r1", iterations: int = 4, approval: str = "auto"):
    return RunSettings(name=name, config_path=str(root / "configs" / "fake.yaml"),
                       iterations=iterations, approval=approval, agent="scripted",
                       runner="subprocess")


async def run_engine(root: Path, agent=None, **kwargs) -> tuple[Engine, list[ev.Event]]:
    seen: list[ev.Event] = []
    config = load_config(root / "configs" / "fake.yaml")
    engine = Engine.create(root, config, settings(root, **kwargs), agent or ScriptedAgent(),
                           seen.append)
    try:
        await engine.run()
    finally:
        engine.close()
    return engine, seen


async def test_headless_run_keeps_files_journal_and_tree_consistent(project):
    engine, seen = await run_engine(project)
    run_dir = project / "log" / "r1"
    journal = Journal.open_for_client(run_dir)
    assert journal.completed_iterations() == [1, 2, 3, 4]
    assert journal.unfinished_iterations() == []
    journal.close()
    assert sorted(node.id for node in engine.tree) == [1, 2, 3, 4]
    analysis = (run_dir / "analysis.md").read_text()
    assert [line.split(":")[0] for line in analysis.splitlines() if line.startswith("## Iter")] \
        == ["## Iter 1", "## Iter 2", "## Iter 3", "## Iter 4"]
    for iteration in range(1, 5):
        snapshot = run_dir / "configs" / f"iter_{iteration:03d}.yaml"
        assert snapshot.exists()
        assert (run_dir / "nodes" / f"{iteration:03d}" / "training.log").read_text()
    assert "learning_rate: 0.0001" in (run_dir / "configs" / "iter_002.yaml").read_text()
    reasoning = (run_dir / "reasoning.log").read_text()
    assert reasoning.count("=== Iteration ") == 4
    assert "proposed iteration 4" in (run_dir / "memory.md").read_text()
    assert "=== UCB Scores" in (run_dir / "ucb_scores.txt").read_text()
    assert (run_dir / "protocols" / "block_001.md").exists()
    assert (run_dir / "memory" / "block_001.md").exists()
    # metrics in the log are the harness's, never the agent's
    node2 = engine.tree.get(2)
    assert f"final_r2={node2.metrics['final_r2']:.3f}" in analysis
    kinds = [type(e).__name__ for e in seen]
    assert kinds[0] == "RunOpened" and kinds[-1] == "RunFinished"
    assert any(isinstance(e, ev.LogLines) for e in seen)


async def test_code_edit_is_inherited_and_branching_back_restores_code(project):
    before = UserState.of(project)
    engine, _ = await run_engine(project, iterations=4)
    node3 = engine.tree.get(3)
    assert node3.code_changed
    # node 3's code raised BONUS by 0.01: its score carries it, its parent's does not
    parent = engine.tree.get(node3.parent_id)
    run_dir = project / "log" / "r1"
    assert "BONUS = 0.01" in git(project, "show", f"{node3.commit}:models/siren.py")
    assert git(project, "rev-parse", "refs/proctor/r1/nodes/3") == node3.commit
    assert "+BONUS = 0.01" in (run_dir / "nodes" / "003" / "change.diff").read_text()
    assert node3.metrics["final_r2"] == pytest.approx(parent.metrics["final_r2"] + 0.01)
    # the user's checkout, HEAD, branch and index are untouched
    original = (FAKE / "models" / "siren.py").read_text()
    assert (project / "models" / "siren.py").read_text() == original
    assert UserState.of(project) == before


async def test_a_project_outside_git_gets_a_private_repository(plain_project):
    engine, _ = await run_engine(plain_project, iterations=3)
    node3 = engine.tree.get(3)
    private = plain_project / "log" / "r1" / "repo.git"
    assert node3.code_changed and (private / "HEAD").exists()
    assert "BONUS = 0.01" in git(private, "show", f"{node3.commit}:models/siren.py")
    assert "harness.py" in git(private, "ls-tree", "-r", "--name-only", node3.commit)
    assert not (plain_project / ".git").exists()


class InvalidEditAgent(ScriptedAgent):
    async def propose(self, context):
        reply = await super().propose(context)
        if context.iteration == 2:
            from engine.proposal import CodeEdit, Proposal, Strategy

            bad = Proposal(parent_id=1, strategy=Strategy.CODE_CHANGE,
                           edits=(CodeEdit(file="models/siren.py", search="BONUS = 9",
                                           replace="BONUS = ("),))
            return type(reply)(bad, "bad edit")
        return reply


async def test_invalid_edit_is_retried_then_skipped_without_touching_files(project):
    agent = InvalidEditAgent()
    engine, seen = await run_engine(project, agent=agent, iterations=3)
    invalid = [e for e in seen if isinstance(e, ev.ProposalInvalid)]
    assert len(invalid) == 2  # the first try and one repair (repair_attempts: 1)
    assert "does not occur" in invalid[0].error
    repairs = [c.repair for c in agent.contexts if c.iteration == 2 and c.repair]
    assert repairs and "does not occur" in repairs[0].error
    assert any(isinstance(e, ev.IterationSkipped) and e.iteration == 2 for e in seen)
    assert 2 not in engine.tree and 3 in engine.tree
    assert git(project, "for-each-ref", "refs/proctor/r1/attempts/2") == ""


class CrashingCodeAgent(ScriptedAgent):
    async def propose(self, context):
        from engine.proposal import CodeChange, CodeEdit, Proposal, Strategy

        if context.iteration == 2:
            return type(await super().propose(context))(Proposal(
                parent_id=1, strategy=Strategy.REPAIR if context.repair else
                Strategy.CODE_CHANGE,
                edits=(CodeEdit(file="models/trainer.py", search="import math",
                                replace="import math\nraise RuntimeError('broken edit')"),),
                code_change=CodeChange(file="models/trainer.py", function="fit",
                                       change="a broken import"),
                mutation="[code] broken"), "crash me")
        return await super().propose(context)


async def test_crashing_code_gets_repairs_then_fails_and_is_never_inherited(project):
    agent = CrashingCodeAgent()
    engine, seen = await run_engine(project, agent=agent, iterations=3)
    node2 = engine.tree.get(2)
    assert str(node2.status) == "failed"
    repair_contexts = [c for c in agent.contexts if c.iteration == 2 and c.repair]
    assert len(repair_contexts) == 1
    assert "broken edit" in repair_contexts[0].repair.error
    memory = (project / "log" / "r1" / "memory.md").read_text()
    assert "node 2: a broken import" in memory
    assert engine.tree.get(3).parent_id != 2


async def test_decisions_bind_to_the_proposal_they_name_and_nothing_else(project):
    """A decision for another proposal, or sent while nothing waits, is refused at once and
    never held: the rejected attempt's id cannot approve the re-proposal the human has not
    seen; the reject reason reaches the agent; the human's approval is in the commit."""
    agent = ScriptedAgent()
    config = load_config(project / "configs" / "fake.yaml")
    seen: list[ev.Event] = []
    run_dir = project / "log" / "r1"

    def post(command: ev.Command) -> None:
        payload = command.to_payload()
        with Journal.open_for_client(run_dir) as client:
            client.post_command(payload.pop("kind"), payload)

    def publish(event):
        seen.append(event)
        if isinstance(event, ev.IterationStarted) and event.iteration == 2:
            post(ev.Approve("3.0-0000000000"))  # nothing waits: refused, not kept for later
        if isinstance(event, ev.ProposalReady) and event.awaiting_review:
            waiting = [e for e in seen if isinstance(e, ev.ProposalReady) and e.awaiting_review]
            if len(waiting) == 1:
                post(ev.Reject(event.proposal_id, "no code changes today"))
            else:
                post(ev.Approve(waiting[0].proposal_id))  # the attempt the human rejected
                post(ev.Approve(event.proposal_id, by="Ada Lovelace <ada@example.org>"))

    engine = Engine.create(project, config, settings(project, iterations=3, approval="code"),
                           agent, publish)
    await engine.run()
    engine.close()
    ready = [e for e in seen if isinstance(e, ev.ProposalReady) and e.awaiting_review]
    assert [e.proposal_id.split("-")[0] for e in ready] == ["3.0", "3.1"]
    assert ready[0].proposal_id != ready[1].proposal_id
    refusals = [e.message for e in seen if isinstance(e, ev.EngineError)
                and e.message.startswith("ignored")]
    assert len(refusals) == 2
    assert "nothing waits for review" in refusals[0]
    assert ready[0].proposal_id in refusals[1] and ready[1].proposal_id in refusals[1]
    decided = [e for e in seen if isinstance(e, ev.ProposalDecided) and e.by == "human"]
    assert [(d.approved, d.reason, d.proposal_id) for d in decided] == [
        (False, "no code changes today", ready[0].proposal_id), (True, "", ready[1].proposal_id)]
    third = [c for c in agent.contexts if c.iteration == 3]
    assert third[-1].rejections == ("no code changes today",)
    node = engine.tree.get(3)
    assert node.code_changed
    message = git(project, "log", "-1", "--format=%B", node.commit)
    assert "Proctor-Approved-By: Ada Lovelace <ada@example.org>" in message
    reasoning = (run_dir / "reasoning.log").read_text()
    assert "=== Iteration 3 ===" in reasoning and "=== Iteration 3 (attempt 1) ===" in reasoning
    with Journal.open_for_client(run_dir) as journal:
        assert waiting_review(journal) is None
        reviews = [e.payload for e in journal.events(3) if e.step == Step.REVIEW]
    assert [r["proposal_id"] for r in reviews] == [e.proposal_id for e in ready]
    assert reviews[1]["files"] == ["models/siren.py"] and reviews[1]["added"] == 1
    assert "BONUS = 0.01" in reviews[1]["texts"]["models/siren.py"]  # what a human would edit
    with Journal.open_for_client(run_dir) as journal:
        assert find_review(journal, ready[1].proposal_id).diff == ready[1].diff
        assert find_review(journal, ready[0].proposal_id.replace("3.0", "3.1")) is None


def drive(root: Path, name: str, iterations: int, *extra: str, env=None):
    return subprocess.run(
        [sys.executable, str(HERE / "loop_driver.py"), str(root), name, str(iterations), *extra],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize("step", [s.value for s in Step if s is not Step.DECISION] + ["decision"])
def test_sigkill_at_every_journal_step_resumes_without_loss(project, step):
    crashed = drive(project, "r1", 3, env={"PROCTOR_CRASH_AFTER": f"2:{step}"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    resumed = drive(project, "r1", 3, "resume")
    assert resumed.returncode == 0, resumed.stderr
    run_dir = project / "log" / "r1"
    with Journal.open_for_client(run_dir) as journal:
        assert journal.completed_iterations() == [1, 2, 3]
        assert journal.unfinished_iterations() == []
        proposals = [e for e in journal.events(2) if e.step == Step.PROPOSAL_STORED]
    assert len(proposals) == 1  # the stored proposal was reused, not asked again
    analysis = (run_dir / "analysis.md").read_text()
    headers = [line.split(":")[0] for line in analysis.splitlines() if line.startswith("## Iter")]
    assert headers == ["## Iter 1", "## Iter 2", "## Iter 3"]
    assert (run_dir / "reasoning.log").read_text().count("=== Iteration 2 ===") == 1


def run_processes(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
    return found


def test_a_killed_engine_takes_its_training_along_and_resume_reruns_it(project):
    config = project / "configs" / "fake.yaml"
    config.write_text(config.read_text().replace("seed: 0", "seed: 0\n  step_sleep: 0.2")
                      .replace("steps: 3", "steps: 40"))
    run_dir = project / "log" / "r1"
    engine = subprocess.Popen(
        [sys.executable, str(HERE / "loop_driver.py"), str(project), "r1", "1"], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = run_dir / "sandbox" / "train" / "harness.started"
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    marker = str(run_dir / "sandbox" / "train_out")
    assert run_processes(marker), "the training step is not running"
    engine.kill()
    engine.wait()
    deadline = time.monotonic() + 10
    while run_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_processes(marker) == [], "the training outlived its supervisor"
    resumed = drive(project, "r1", 1, "resume")
    assert resumed.returncode == 0, resumed.stderr
    with Journal.open_for_client(run_dir) as journal:
        assert journal.completed_iterations() == [1]
        starts = [e for e in journal.events(1) if e.step == Step.RUN_STARTED]
    assert len(starts) == 1


async def test_second_engine_on_the_same_run_is_refused(project):
    config = load_config(project / "configs" / "fake.yaml")
    first = Engine.create(project, config, settings(project), ScriptedAgent())
    try:
        before = sorted(p.name for p in (project / "log" / "r1").iterdir())
        with pytest.raises(RunLockedError, match="r1"):
            Engine.reopen(project / "log" / "r1", lambda c, s: ScriptedAgent())
        assert sorted(p.name for p in (project / "log" / "r1").iterdir()) == before
    finally:
        first.close()


class PausingAgent(ScriptedAgent):
    """Hits a spend limit once at iteration 2, like the Claude agent on a 429 without
    retry-after."""

    paused_once = False

    async def propose(self, context):
        from engine.agents.base import AgentPaused

        if context.iteration == 2 and not self.paused_once:
            self.paused_once = True
            raise AgentPaused("spend limit reached (429 without retry-after)")
        return await super().propose(context)


async def test_agent_pause_is_durable_and_resumes_the_same_iteration(project):
    seen: list[ev.Event] = []

    def publish(event):
        seen.append(event)
        if isinstance(event, ev.Paused):
            with Journal.open_for_client(project / "log" / "r1") as client:
                assert client.state("paused") == "spend limit reached (429 without retry-after)"
                client.post_command("ResumeRun", {})

    config = load_config(project / "configs" / "fake.yaml")
    engine = Engine.create(project, config, settings(project, iterations=3), PausingAgent(),
                           publish)
    await engine.run()
    engine.close()
    assert [type(e).__name__ for e in seen].count("Paused") == 1
    assert not any(isinstance(e, ev.IterationSkipped) for e in seen)
    with Journal.open_for_client(project / "log" / "r1") as journal:
        assert journal.completed_iterations() == [1, 2, 3]
        assert journal.state("paused") is None


def _mount_tmpfs(target: Path, size: str) -> bool:
    target.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                             capture_output=True)
    return mounted.returncode == 0


async def test_disk_full_pauses_with_a_clear_message_and_the_journal_survives(tmp_path):
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "16m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        project = copy_fake(mount / "project")
        filler = mount / "filler"
        filled: list[bool] = []
        seen: list[ev.Event] = []

        def publish(event):
            seen.append(event)
            if isinstance(event, ev.NodeFinished) and event.node_id == 1 and not filled:
                filled.append(True)
                # take every free byte of the disk
                with open(filler, "wb") as handle, contextlib.suppress(OSError):
                    while True:
                        handle.write(b"\0" * (1 << 16))
                        handle.flush()
            if isinstance(event, ev.Paused):
                filler.unlink(missing_ok=True)
                with Journal.open_for_client(project / "log" / "r1") as client:
                    client.post_command("ResumeRun", {})

        config = load_config(project / "configs" / "fake.yaml")
        engine = Engine.create(project, config, settings(project, iterations=3),
                               ScriptedAgent(), publish)
        await engine.run()
        engine.close()
        paused = [e for e in seen if isinstance(e, ev.Paused)]
        assert paused and "disk full" in paused[0].reason
        with Journal.open_for_client(project / "log" / "r1") as journal:
            assert journal.completed_iterations() == [1, 2, 3]
            assert journal.unfinished_iterations() == []
        analysis = (project / "log" / "r1" / "analysis.md").read_text()
        headers = [line.split(":")[0] for line in analysis.splitlines() if line.startswith("## ")]
        assert headers == ["## Iter 1", "## Iter 2", "## Iter 3"]
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_an_engine_whose_journal_file_goes_stops_with_a_clear_message(project, how):
    """FAULTS 34: steps written into an unlinked or swapped journal reach nobody; the engine
    notices at its next step and stops instead of running on."""
    seen: list[ev.Event] = []
    journal_path = project / "log" / "r1" / "journal.sqlite"

    def publish(event):
        seen.append(event)
        if isinstance(event, ev.NodeFinished) and event.node_id == 1:
            saved = journal_path.with_suffix(".saved")
            journal_path.rename(saved)
            if how == "replaced":
                journal_path.write_bytes(saved.read_bytes())

    config = load_config(project / "configs" / "fake.yaml")
    engine = Engine.create(project, config, settings(project, iterations=4), ScriptedAgent(),
                           publish)
    finished = await engine.run()
    engine.close()
    assert "deleted or replaced" in finished.reason and str(journal_path) in finished.reason
    started = [e.iteration for e in seen if isinstance(e, ev.IterationStarted)]
    assert started == [1]  # no iteration ran into the lost file
    assert any(isinstance(e, ev.EngineError) and "deleted or replaced" in e.message
               for e in seen)


async def test_config_snapshots_hold_the_settings_that_ran(project):
    """`--iterations 2 --approve auto` over a file saying 24 and `code`: the snapshots and
    config.yaml say what ran."""
    config_file = project / "configs" / "fake.yaml"
    text = config_file.read_text()
    config_file.write_text(text.replace("approval: auto", "approval: code").replace(
        "iterations: 4", "iterations: 24"))
    git(project, "commit", "-q", "-am", "the file asks for 24 iterations under review")
    config = load_config(config_file)
    assert (config.exploration.iterations, config.exploration.approval) == (24, "code")
    engine = Engine.create(project, config, settings(project, iterations=2, approval="auto"),
                           ScriptedAgent())
    await engine.run()
    engine.close()
    run_dir = project / "log" / "r1"
    for path in (run_dir / "configs" / "iter_002.yaml", run_dir / "config.yaml"):
        exploration = yaml.safe_load(path.read_text())["exploration"]
        assert (exploration["iterations"], exploration["approval"]) == (2, "auto"), path
    resumed = Engine.reopen(run_dir, lambda c, s: ScriptedAgent(), iterations=3)
    await resumed.run()
    resumed.close()
    for path in (run_dir / "configs" / "iter_003.yaml", run_dir / "config.yaml"):
        assert yaml.safe_load(path.read_text())["exploration"]["iterations"] == 3, path


async def test_a_decision_made_while_no_engine_ran_applies_to_that_proposal_on_resume(project):
    """`proctor approve` while the engine is down: kept for the proposal that waited, which
    the resumed engine applies without asking again (and no other proposal would take it)."""
    config = load_config(project / "configs" / "fake.yaml")
    run_dir = project / "log" / "r1"
    first: list[ev.Event] = []

    def stop_at_review(event):
        first.append(event)
        if isinstance(event, ev.ProposalReady) and event.awaiting_review:
            engine.submit(ev.Stop("down for the night"))

    engine = Engine.create(project, config, settings(project, iterations=3, approval="code"),
                           ScriptedAgent(), stop_at_review)
    await engine.run()
    engine.close()
    ready = [e for e in first if isinstance(e, ev.ProposalReady) and e.awaiting_review]
    with Journal.open_for_client(run_dir) as client:
        assert waiting_review(client).proposal_id == ready[0].proposal_id
        client.post_command("Approve", {"proposal_id": ready[0].proposal_id,
                                        "by": "Night Owl <owl@example.org>"})
    seen: list[ev.Event] = []
    resumed = Engine.reopen(run_dir, lambda c, s: ScriptedAgent(), seen.append)
    await asyncio.wait_for(resumed.run(), 120)
    resumed.close()
    decided = [e for e in seen if isinstance(e, ev.ProposalDecided)]
    assert [(d.iteration, d.approved, d.by, d.proposal_id) for d in decided] == [
        (3, True, "human", ready[0].proposal_id)]
    assert not any(isinstance(e, ev.EngineError) and "ignored" in e.message for e in seen)
    message = git(project, "log", "-1", "--format=%B", resumed.tree.get(3).commit)
    assert "Proctor-Approved-By: Night Owl <owl@example.org>" in message


async def test_a_reject_reason_is_text_whatever_bytes_the_human_typed(project):
    """A reason with a byte that is not UTF-8 (`--reason $'caf\\xe9'`) and terminal escapes
    reaches the agent and memory as plain text; the engine runs on."""
    agent = ScriptedAgent()
    seen: list[ev.Event] = []

    def publish(event):
        seen.append(event)
        if isinstance(event, ev.ProposalReady) and event.awaiting_review:
            waiting = [e for e in seen if isinstance(e, ev.ProposalReady) and e.awaiting_review]
            with Journal.open_for_client(project / "log" / "r1") as client:
                if len(waiting) == 1:
                    client.post_command("Reject", {"proposal_id": event.proposal_id,
                                                   "reason": "caf\udce9 \x1b]0;x\x07\x1b[31mno"})
                else:
                    client.post_command("Approve", {"proposal_id": event.proposal_id})

    config = load_config(project / "configs" / "fake.yaml")
    engine = Engine.create(project, config, settings(project, iterations=3, approval="code"),
                           agent, publish)
    await engine.run()
    engine.close()
    third = [c for c in agent.contexts if c.iteration == 3]
    assert third[-1].rejections == ("caf\ufffd no",)
    assert engine.tree.get(3).code_changed


async def test_a_pause_holds_a_proposal_approved_while_paused(project):
    """Paused while a proposal waits, then approved: nothing trains until the run resumes."""
    seen: list[ev.Event] = []

    def publish(event):
        seen.append(event)
        if isinstance(event, ev.ProposalReady) and event.awaiting_review:
            engine.submit(ev.Pause("lunch"))
            engine.submit(ev.Approve(event.proposal_id))
        if isinstance(event, ev.ProposalDecided) and event.by == "human":
            engine.submit(ev.ResumeRun())  # taken only once the pause holds the iteration

    config = load_config(project / "configs" / "fake.yaml")
    engine = Engine.create(project, config, settings(project, iterations=3, approval="code"),
                           ScriptedAgent(), publish)
    await engine.run()
    engine.close()
    kinds = [(type(e).__name__, getattr(e, "iteration", None)) for e in seen
             if isinstance(e, ev.ProposalDecided | ev.Paused | ev.Resumed | ev.TrainingStarted)]
    assert kinds[kinds.index(("ProposalDecided", 3)):] == [
        ("ProposalDecided", 3), ("Resumed", None), ("TrainingStarted", 3)]
    assert ("Paused", None) in kinds[:kinds.index(("ProposalDecided", 3))]
