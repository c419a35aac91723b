"""Code lineage in git: real repositories in temp folders, the real engine and runner.

The fake experiment's score is `fit(learning_rate) + siren.BONUS`, so a node's metrics show
which code it ran."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import unprivileged
from git_project import UserState, git, make_git_project
from scripted_agent import ScriptedAgent

from engine import events as ev
from engine.agents.base import AgentReply
from engine.config import load_config
from engine.loop import Engine
from engine.proposal import CodeChange, CodeEdit, Proposal, Strategy
from engine.runs import EngineError, RunSettings
from engine.vcs import (
    Identity,
    Lineage,
    RepoInfo,
    VcsError,
    change_counts,
    clear_stale_lock,
    commit_message,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_git_project(tmp_path / "project")


def settings(root: Path, iterations: int, approval: str = "auto", name: str = "r1"):
    return RunSettings(name=name, config_path=str(root / "configs" / "fake.yaml"),
                       iterations=iterations, approval=approval, agent="scripted",
                       runner="subprocess", watch_edits=False)


async def run_engine(root: Path, agent, iterations: int, before_run=None, **kwargs):
    seen: list[ev.Event] = []
    config = load_config(root / "configs" / "fake.yaml")
    engine = Engine.create(root, config, settings(root, iterations, **kwargs), agent,
                           seen.append)
    try:
        if before_run is not None:
            before_run(engine)
        await engine.run()
    finally:
        engine.close()
    return engine, seen


def bonus_edit(parent_id: int | None, current: str, new: float) -> Proposal:
    line = next(x for x in current.splitlines() if x.startswith("BONUS"))
    return Proposal(
        parent_id=parent_id, strategy=Strategy.CODE_CHANGE,
        edits=(CodeEdit(file="models/siren.py", search=line, replace=f"BONUS = {new:.2f}"),),
        code_change=CodeChange(file="models/siren.py", function="module",
                               change=f"set BONUS to {new:.2f}"),
        mutation=f"[code] bonus {new:.2f}", hypothesis="more bonus, more R2")


class PlanAgent(ScriptedAgent):
    """Follows a plan: iteration -> (parent, "code" with a BONUS value | "config" rate)."""

    def __init__(self, plan: dict[int, tuple[int | None, str, float]]):
        super().__init__()
        self.plan = plan

    async def propose(self, context):
        self.contexts.append(context)
        parent, kind, value = self.plan[context.iteration]
        if kind == "code":
            proposal = bonus_edit(parent, context.read_file(parent, "models/siren.py"), value)
        elif kind == "config":
            proposal = Proposal(parent_id=parent, strategy=Strategy.EXPLOIT,
                                config_changes={"training.learning_rate": value})
        else:
            proposal = Proposal(parent_id=parent, strategy=Strategy.BASELINE)
        return AgentReply(proposal, reasoning=f"plan {context.iteration}")


# -- the commit message --------------------------------------------------------------------


def test_commit_message_has_true_counts_per_file_and_trailers():
    before = {"models/a.py": "x = 1\ny = 2\n", "models/b.py": "z = 3\n"}
    after = {"models/a.py": "x = 1\ny = 5\nw = 6\nv = 7\n", "models/b.py": "z = 3\n"}
    text = commit_message(12, "Added CosineAnnealingLR scheduler in train (models/a.py)",
                          "Decaying learning rate\nmay escape", change_counts(before, after),
                          "r1", 12)
    assert text == (
        "[Iter 12] Added CosineAnnealingLR scheduler in train (models/a.py)\n"
        "Hypothesis: Decaying learning rate may escape\n\n"
        "File: models/a.py\nChanges: +3 lines, -1 lines\n\n"
        "Proctor-Run: r1\nProctor-Node: 12\n")


# -- lineage through the engine ------------------------------------------------------------


async def test_nodes_commit_on_their_parents_commit_and_old_parents_run_their_own_code(project):
    plan = {1: (None, "baseline", 0), 2: (1, "code", 0.01), 3: (2, "code", 0.02),
            4: (1, "config", 1e-4), 5: (2, "config", 1e-4)}
    user = UserState.of(project)
    engine, seen = await run_engine(project, PlanAgent(plan), 5)
    nodes = {i: engine.tree.get(i) for i in range(1, 6)}
    base = git(project, "rev-parse", "HEAD")
    assert nodes[1].commit == base and not nodes[1].code_changed
    assert git(project, "rev-parse", f"{nodes[2].commit}^") == base
    assert git(project, "rev-parse", f"{nodes[3].commit}^") == nodes[2].commit
    # branching back to node 1 runs node 1's code (no BONUS), to node 2 runs node 2's
    fit = nodes[4].metrics["final_r2"]
    assert nodes[4].commit == base and nodes[5].commit == nodes[2].commit
    assert nodes[5].metrics["final_r2"] == pytest.approx(fit + 0.01)
    assert nodes[3].metrics["final_r2"] == pytest.approx(nodes[1].metrics["final_r2"] + 0.02)
    # the agent saw each candidate's own files
    context5 = engine.agent.contexts[-1]
    assert "BONUS = 0.02" in context5.read_file(3, "models/siren.py")
    assert "BONUS = 0.0\n" in context5.read_file(1, "models/siren.py")
    # message, author, trailers, refs; `git log` of a node ref is its code's lineage
    message = git(project, "log", "-1", "--format=%B", "refs/proctor/r1/nodes/3")
    assert message.splitlines()[0] == "[Iter 3] set BONUS to 0.02 (models/siren.py)"
    assert "Changes: +1 lines, -1 lines" in message
    assert "Proctor-Run: r1\nProctor-Node: 3" in message
    assert git(project, "log", "--format=%an", "-1", nodes[3].commit) == \
        "proctor scripted agent"
    lineage = git(project, "rev-list", "refs/proctor/r1/nodes/3").splitlines()
    assert lineage[:3] == [nodes[3].commit, nodes[2].commit, base]
    assert git(project, "rev-parse", "refs/proctor/r1/base") == base
    best = max(nodes.values(), key=lambda n: n.metrics["final_r2"])
    assert git(project, "rev-parse", "proctor/r1/best") == best.commit
    assert any(isinstance(e, ev.CodeCommitted) and e.node_id == 3 for e in seen)
    # nothing of the user's moved
    assert UserState.of(project) == user


async def test_failed_code_is_kept_for_inspection_but_never_offered_as_a_parent(project):
    class Breaks(PlanAgent):
        async def propose(self, context):
            if context.iteration == 2:
                self.contexts.append(context)
                return AgentReply(Proposal(
                    parent_id=1, strategy=Strategy.REPAIR if context.repair else
                    Strategy.CODE_CHANGE,
                    edits=(CodeEdit(file="models/trainer.py", search="import math",
                                    replace=f"import math\nraise SystemExit({context.attempt})"),),
                    code_change=CodeChange(file="models/trainer.py", change="a broken import"),
                ), "break")
            return await super().propose(context)

    engine, _ = await run_engine(project, Breaks({1: (None, "baseline", 0),
                                                  3: (1, "config", 1e-4)}), 3)
    assert str(engine.tree.get(2).status) == "failed"
    attempts = git(project, "for-each-ref", "--format=%(refname)", "refs/proctor/r1/attempts/2")
    assert attempts.splitlines() == ["refs/proctor/r1/attempts/2/0", "refs/proctor/r1/attempts/2/1"]
    assert git(project, "rev-parse", "refs/proctor/r1/nodes/2") == engine.tree.get(2).commit
    assert "SystemExit(1)" in git(project, "show", "refs/proctor/r1/nodes/2:models/trainer.py")
    assert 2 not in engine.agent.contexts[-1].candidates
    assert engine.tree.get(3).parent_id == 1


async def test_revert_creates_a_new_node_with_the_parents_code(project):
    plan = {1: (None, "baseline", 0), 2: (1, "code", 0.05), 3: (2, "config", 1e-4)}
    engine, _ = await run_engine(project, PlanAgent(plan), 3)
    node2 = engine.tree.get(2)
    run_dir = project / "log" / "r1"
    # the run has stopped: the CLI posts the command, the resumed engine applies it
    from tui.cli import main

    cwd = os.getcwd()
    os.chdir(project)
    try:
        assert main(["revert", "r1", "2"]) == 0
        assert main(["revert", "r1", "99"]) == 2
    finally:
        os.chdir(cwd)
    seen: list[ev.Event] = []
    resumed = Engine.reopen(run_dir, lambda c, s: PlanAgent(plan), seen.append)
    try:
        await resumed.run()
    finally:
        resumed.close()
    node4 = resumed.tree.get(4)
    assert (node4.parent_id, node4.author, node4.strategy) == (2, "human", "revert")
    assert node4.config == resumed.tree.get(1).config
    assert node4.metrics["final_r2"] == pytest.approx(resumed.tree.get(1).metrics["final_r2"])
    # a new commit on node 2's commit whose tree is node 1's: history is not rewritten
    assert git(project, "rev-parse", f"{node4.commit}^") == node2.commit
    assert git(project, "rev-parse", f"{node4.commit}^{{tree}}") == \
        git(project, "rev-parse", "HEAD^{tree}")
    assert git(project, "rev-parse", "refs/proctor/r1/nodes/2") == node2.commit
    assert "Revert node 2" in git(project, "log", "-1", "--format=%s", node4.commit)
    assert git(project, "log", "-1", "--format=%an", node4.commit) == "Test Human"
    assert any(isinstance(e, ev.NodeReverted) and e.reverted_id == 2 for e in seen)


async def test_revert_submitted_to_a_live_run_takes_the_next_iteration(project):
    plan = {1: (None, "baseline", 0), 2: (1, "code", 0.05), 3: (2, "config", 1e-4),
            5: (1, "config", 1e-3)}
    engine_box: list[Engine] = []

    class Reverting(PlanAgent):
        async def propose(self, context):
            if context.iteration == 3:
                engine_box[0].submit(ev.Revert(2))
            return await super().propose(context)

    engine, _ = await run_engine(project, Reverting(plan), 5, before_run=engine_box.append)
    assert engine.tree.get(4).strategy == "revert"
    assert engine.tree.get(5).mutation != "[revert] node 2"


def drive(root: Path, iterations: int, *extra: str, env=None):
    return subprocess.run(
        [sys.executable, str(HERE / "loop_driver.py"), str(root), "r1", str(iterations), *extra],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120,
    )


def test_sigkill_between_commit_and_refs_makes_no_duplicate_commit(project):
    crashed = drive(project, 3, env={"PROCTOR_CRASH_AFTER": "git:commit-tree"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert git(project, "for-each-ref", "refs/proctor/r1/nodes") == ""  # the refs never came
    resumed = drive(project, 3, "resume")
    assert resumed.returncode == 0, resumed.stderr
    objects = git(project, "cat-file", "--batch-all-objects", "--batch-check").splitlines()
    commits = [line.split()[0] for line in objects if line.split()[1] == "commit"]
    node3 = [sha for sha in commits
             if "Proctor-Node: 3" in git(project, "cat-file", "commit", sha)]
    assert len(node3) == 1
    assert git(project, "rev-parse", "refs/proctor/r1/nodes/3") == node3[0]


def test_stale_temporary_index_lock_is_cleared_only_when_its_owner_is_gone(tmp_path):
    lock = tmp_path / "git-index.lock"
    lock.write_text("left by a killed git")
    assert clear_stale_lock(lock) is True and not lock.exists()
    lock.write_text("held")
    with open(lock) as held:  # this process is a live owner
        with pytest.raises(VcsError, match=f"pid {os.getpid()}"):
            clear_stale_lock(lock, wait_s=0.1)
        assert lock.exists()
        del held


async def test_a_stale_lock_on_the_temporary_index_does_not_block_commits(project):
    run_dir = project / "log" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "git-index.lock").write_text("")
    (project / ".git" / "index.lock").write_text("")  # the user's: must stay
    old = time.time() - 3600
    os.utime(project / ".git" / "index.lock", (old, old))
    plan = {1: (None, "baseline", 0), 2: (1, "code", 0.01)}
    engine, seen = await run_engine(project, PlanAgent(plan), 2)
    assert engine.tree.get(2).code_changed and engine.tree.get(2).commit
    assert not (run_dir / "git-index.lock").exists()
    assert (project / ".git" / "index.lock").exists()
    assert any(isinstance(e, ev.EngineError) and "index.lock" in e.message for e in seen)


# -- the user's repository: hooks, dirty files, no commit yet ------------------------------


HOOK = "#!/bin/sh\ntouch \"{marker}\"\n"


async def test_hooks_planted_in_the_repository_never_run(project, tmp_path):
    marker = tmp_path / "hook-ran"
    hooks = project / ".git" / "hooks"
    elsewhere = tmp_path / "evil-hooks"
    elsewhere.mkdir()
    for folder in (hooks, elsewhere):
        for name in ("post-commit", "reference-transaction", "post-index-change",
                     "pre-commit", "commit-msg", "post-checkout", "fsmonitor-watchman"):
            hook = folder / name
            hook.write_text(HOOK.format(marker=marker))
            hook.chmod(0o755)
    # what training code with write access might try: a local hooksPath and fsmonitor
    git(project, "config", "core.hooksPath", str(elsewhere))
    git(project, "config", "core.fsmonitor", str(elsewhere / "fsmonitor-watchman"))
    plan = {1: (None, "baseline", 0), 2: (1, "code", 0.01), 3: (2, "code", 0.02)}
    engine, _ = await run_engine(project, PlanAgent(plan), 3)
    assert engine.tree.get(3).code_changed
    assert not marker.exists()
    # the same hooks do run for the user's own git (the test plants real ones)
    git(project, "update-ref", "refs/heads/probe", "HEAD")
    assert marker.exists()


def test_uncommitted_edits_to_editable_files_refuse_the_run_by_default(project):
    siren = project / "models" / "siren.py"
    siren.write_text(siren.read_text() + "# my experiment\n")
    user = UserState.of(project)
    config = load_config(project / "configs" / "fake.yaml")
    with pytest.raises(EngineError, match="models/siren.py") as refused:
        Engine.create(project, config, settings(project, 2), ScriptedAgent())
    assert "exploration.dirty: adopt" in str(refused.value)
    assert not (project / "log" / "r1" / "journal.sqlite").exists()
    assert UserState.of(project) == user


async def test_adopted_pre_existing_changes_become_the_first_node(project):
    config_path = project / "configs" / "fake.yaml"
    config_path.write_text(config_path.read_text().replace("repair_attempts: 1",
                                                           "repair_attempts: 1\n  dirty: adopt"))
    git(project, "commit", "-q", "-am", "adopt dirty files")
    siren = project / "models" / "siren.py"
    siren.write_text(siren.read_text().replace("BONUS = 0.0", "BONUS = 0.03"))
    (project / "notes.txt").write_text("unrelated, untracked\n")
    readme = project / "instructions" / "protocol.md"
    readme.write_text(readme.read_text() + "\nunrelated, modified\n")
    user = UserState.of(project)
    plan = {2: (1, "config", 1e-3)}
    engine, _ = await run_engine(project, PlanAgent(plan), 2)
    node1 = engine.tree.get(1)
    assert (node1.parent_id, node1.author, node1.strategy) == (None, "human", "manual-edit")
    assert "pre-existing changes" in git(project, "log", "-1", "--format=%s", node1.commit)
    assert git(project, "log", "-1", "--format=%an <%ae>", node1.commit) == \
        "Test Human <human@example.org>"
    changed = git(project, "diff", "--name-only", "HEAD", node1.commit).splitlines()
    assert changed == ["models/siren.py"]  # unrelated files are never staged
    assert engine.tree.get(2).metrics["final_r2"] == pytest.approx(0.9 + 0.03)
    assert UserState.of(project) == user  # still uncommitted, unstashed, untouched


def test_a_repository_without_commits_is_refused_with_instructions(tmp_path):
    from git_project import copy_fake

    root = copy_fake(tmp_path / "project")
    git(root, "init", "-q")
    config = load_config(root / "configs" / "fake.yaml")
    with pytest.raises(EngineError, match="git add -A && git commit -m base"):
        Engine.create(root, config, settings(root, 1), ScriptedAgent())


def test_a_symlinked_editable_file_in_the_checkout_is_refused(project, tmp_path):
    outside = tmp_path / "outside.py"
    outside.write_text("BONUS = 1.0\n")
    siren = project / "models" / "siren.py"
    siren.unlink()
    siren.symlink_to(outside)
    config = load_config(project / "configs" / "fake.yaml")
    with pytest.raises(EngineError, match="symlink"):
        Engine.create(project, config, settings(project, 1), ScriptedAgent())
    assert outside.read_text() == "BONUS = 1.0\n"


def test_best_branch_checked_out_by_the_user_is_left_alone(project, tmp_path):
    base = git(project, "rev-parse", "HEAD")
    info = RepoInfo(str(project), "", False, base)
    lineage = Lineage(info, "r1", tmp_path / "scratch")
    commit = lineage.commit_files(base, {"models/siren.py": "BONUS = 0.5\n"}, "x\n",
                                  Identity("a", "a@b"), 0.0)
    assert lineage.set_best(base) is None
    git(project, "checkout", "-q", "proctor/r1/best")
    warning = lineage.set_best(commit)
    assert warning and "checked out" in warning
    assert git(project, "rev-parse", "HEAD") == base


def test_a_workspace_is_rebuilt_from_scratch_at_a_commit(project, tmp_path):
    from engine.workspace import CodeStore

    base = git(project, "rev-parse", "HEAD")
    lineage = Lineage(RepoInfo(str(project), "", False, base), "r1", tmp_path / "scratch")
    commit = lineage.commit_files(base, {"models/siren.py": "BONUS = 0.25\n"}, "x\n",
                                  Identity("a", "a@b"), 0.0)
    code = CodeStore(tmp_path, "models", ["models/siren.py", "models/trainer.py"], lineage)
    workspace = tmp_path / "workspace"
    code.materialise(base, workspace)
    (workspace / "models" / "__pycache__").mkdir()
    (workspace / "models" / "__pycache__" / "siren.cpython-311.pyc").write_bytes(b"stale")
    (workspace / "harness.pid").write_text("1")
    code.materialise(commit, workspace)
    assert sorted(p.relative_to(workspace).as_posix() for p in workspace.rglob("*")) == [
        "models", "models/__init__.py", "models/harness.py", "models/siren.py",
        "models/trainer.py"]
    assert (workspace / "models" / "siren.py").read_text() == "BONUS = 0.25\n"
    assert code.files_at_commit(base)["models/siren.py"].endswith("BONUS = 0.0\n")


async def test_a_project_in_a_subfolder_of_the_repository(tmp_path):
    from git_project import copy_fake

    outer = tmp_path / "outer"
    project = copy_fake(outer / "experiments" / "fake")
    (outer / ".gitignore").write_text("log/\n__pycache__/\n")
    git(outer, "init", "-q")
    git(outer, "add", "-A")
    git(outer, "commit", "-q", "-m", "base")
    plan = {1: (None, "baseline", 0), 2: (1, "code", 0.03)}
    engine, _ = await run_engine(project, PlanAgent(plan), 2)
    node2 = engine.tree.get(2)
    assert git(outer, "diff", "--name-only", "HEAD", node2.commit) == \
        "experiments/fake/models/siren.py"
    assert node2.metrics["final_r2"] == pytest.approx(engine.tree.get(1).metrics["final_r2"]
                                                      + 0.03)


def test_a_repository_git_distrusts_is_named_as_such_not_as_empty(reachable_tmp):
    """Another user's repository (git's safe.directory guard) gets the command that trusts
    it, not "no commit yet"."""
    if unprivileged.available() is not None or os.geteuid() != 0:
        pytest.skip("needs root, to look at root's repository as another user")
    repo = make_git_project(reachable_tmp / "project")
    for top, _, files in os.walk(reachable_tmp):  # readable by all, still root's
        os.chmod(top, 0o755)
        for name in files:
            os.chmod(os.path.join(top, name), 0o644)
    code = ("import sys\nfrom engine.vcs import VcsError, head_commit\n"
            "try:\n    head_commit(__import__('pathlib').Path(sys.argv[1]))\n"
            "except VcsError as exc:\n    print(exc)\n")
    env = unprivileged.environment_for_nobody(
        {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parent.parent),
         "HOME": str(reachable_tmp)}, reachable_tmp / "hold")
    done = subprocess.run(unprivileged.argv_as_nobody([sys.executable, "-c", code, str(repo)]),
                          env=env, capture_output=True, text=True, timeout=60)
    assert "belongs to another user" in done.stdout, done.stdout + done.stderr
    assert f"safe.directory {repo}" in done.stdout
