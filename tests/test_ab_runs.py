"""`proctor ab`: a code node against its parent's code over paired seeds, through the real
runner on the fake experiment, journaled arm by arm (kill -9 midway loses nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from git_project import make_git_project
from scripted_agent import ScriptedAgent, run_scripted
from waiting import wait_for

from engine.ab_runs import ab_results
from engine.config import load_config
from engine.journal import Journal, RunEvent
from engine.state import RunState

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project_with_a_code_node(tmp_path) -> Path:
    """Three iterations of the scripted agent: node 3 raises the fake model's BONUS by 0.01
    (a code change whose gain is known exactly)."""
    project = make_git_project(tmp_path / "project")
    run_scripted(project)
    return project


def proctor(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tui.cli", *args], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_code_change_that_helps_is_found_to_help_and_kept_with_its_node(
        project_with_a_code_node):
    project = project_with_a_code_node
    done = proctor(project, "ab", "r1", "3", "--seeds", "2")
    out, err = done.communicate(timeout=240)
    assert done.returncode == 0, err
    assert "node 3: ΔR² +0.0100 [+0.0100, +0.0100] over 2 seeds, noise 0.0000: helped" in out
    with Journal.open_for_client(project / "log" / "r1") as journal:
        result = ab_results(journal)[3]
        assert result.verdict == "helped" and result.seeds == (1, 2)
        assert result.node_r2[0] - result.parent_r2[0] == pytest.approx(0.01)
        assert RunState(journal).noise_floor == 0.0  # measured once, kept for the run
    assert (project / "log" / "r1" / "nodes" / "003" / "ab" / "seed-2-node.log").exists()


def test_a_test_killed_midway_goes_on_without_running_an_arm_twice(project_with_a_code_node):
    project = project_with_a_code_node
    run_dir = project / "log" / "r1"
    first = proctor(project, "ab", "r1", "3", "--seeds", "3")
    with Journal.open_for_client(run_dir) as journal:
        wait_for(lambda: len(journal.run_events(RunEvent.AB_RUN)) >= 1, "one arm to end", 120)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    again = proctor(project, "ab", "r1", "3", "--seeds", "3")
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    with Journal.open_for_client(run_dir) as journal:
        arms = [(e.payload["seed"], e.payload["arm"])
                for e in journal.run_events(RunEvent.AB_RUN)]
    assert sorted(arms) == sorted({(seed, arm) for seed in (1, 2, 3)
                                   for arm in ("parent", "node")})  # each once
    assert "over 3 seeds" in out


def test_what_cannot_be_ab_tested_is_one_line(project_with_a_code_node):
    project = project_with_a_code_node
    for args, message in ((("ab", "r1", "2"), "node 2 changed no code against a parent"),
                          (("ab", "r1", "9"), "has no finished node 9"),
                          (("ab", "r1", "3", "--seeds", "1"), "an A/B test takes 2 to 50")):
        refused = proctor(project, *args)
        _, err = refused.communicate(timeout=60)
        assert refused.returncode == 2 and message in err and "Traceback" not in err


def test_with_ab_seeds_a_code_change_that_beats_its_parent_is_tested_before_it_is_a_parent(
        tmp_path):
    project = make_git_project(tmp_path / "project")
    config_path = project / "configs" / "fake.yaml"
    text = config_path.read_text().replace("  repair_attempts: 1\n",
                                           "  repair_attempts: 1\n  ab_seeds: 2\n")
    config_path.write_text(text)
    agent = ScriptedAgent()
    engine = run_scripted(project, iterations=4, agent=agent)
    with Journal.open_for_client(engine.run_dir) as journal:
        results = ab_results(journal)
        arms = journal.run_events(RunEvent.AB_RUN)
    assert list(results) == [3] and results[3].verdict == "helped"  # node 3: BONUS + 0.01
    assert len(arms) == 4  # 2 seeds x 2 arms, in node 3's own iteration
    assert not engine.tree.withheld  # confirmed: it may be a parent
    assert agent.contexts[-1].candidates[0] == 3  # and iteration 4 builds on it
    assert agent.contexts[-1].ab_tests[3].endswith("over 2 seeds, noise 0.0000: helped")


def test_a_withheld_node_is_no_candidate_and_no_parent(tmp_path):
    from engine.proposal import Proposal, Strategy
    from engine.proposals import ProposalChecker, ProposalRejected
    from engine.tree import Node, NodeStatus, Tree

    config = load_config(make_git_project(tmp_path / "p") / "configs" / "fake.yaml")
    tree = Tree(block_size=4)
    base = config.experiment_sections()
    tree.add(Node(1, None, base, metrics={"final_r2": 0.5}, status=NodeStatus.DONE))
    tree.add(Node(2, 1, base, code_changed=True, metrics={"final_r2": 0.6},
                  status=NodeStatus.DONE))
    assert [row.node_id for row in tree.candidates(3)] == [2, 1]
    tree.withheld.add(2)
    assert [row.node_id for row in tree.candidates(3)] == [1]
    checker = ProposalChecker(config, tree, lambda node_id: {})
    with pytest.raises(ProposalRejected, match="A/B test has not confirmed"):
        checker.prepare(3, Proposal(parent_id=2, strategy=Strategy.EXPLOIT,
                                    config_changes={"training.learning_rate": 1e-4}))


def test_the_tree_view_marks_a_tested_code_node_with_its_verdict():
    from engine.tree import NodeStatus, ScoreRow
    from tui.widgets.tree_view import node_label

    row = ScoreRow(node_id=3, parent_id=1, r2=0.61, score=1.2, visits=1, code_changed=True,
                   status=NodeStatus.DONE, mutation="[code] bonus")
    assert "[CODE] A/B helped" in node_label(row, False, False, "helped").plain
    assert "A/B" not in node_label(row, False, False).plain

