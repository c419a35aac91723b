"""The modification metrics of a run, on a hand-built journal whose answers are known."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.ab import compare
from engine.journal import Journal, RunEvent, Step
from engine.stats import change_kind, run_stats
from engine.tree import Node, NodeStatus

REPO = Path(__file__).resolve().parents[1]


def config(rate: float) -> dict:
    return {"training": {"learning_rate": rate, "steps": 3}}


# id, parent, config, code mutation (None: a config change), status, R², run seconds
NODES = [
    (1, None, config(1e-3), None, NodeStatus.DONE, 0.5, 10.0),
    (2, 1, config(3e-3), None, NodeStatus.DONE, 0.7, 20.0),
    (3, 1, config(1e-3), "[code] huber", NodeStatus.DONE, 0.6, 30.0),
    (4, 2, config(3e-3), "[code] huber", NodeStatus.DONE, 0.65, 40.0),
    (5, 2, config(3e-3), "[code] clip", NodeStatus.FAILED, None, 50.0),
    (6, 2, config(1e-2), None, NodeStatus.DONE, 0.8, 60.0),
]


def write_journal(run_dir: Path) -> None:
    with Journal.open_for_engine(run_dir) as journal:
        for node_id, parent, cfg, code, status, r2, seconds in NODES:
            node = Node(node_id, parent, cfg, code_changed=code is not None,
                        metrics={} if r2 is None else {"final_r2": r2}, status=status,
                        mutation=code or "training.learning_rate: x -> y")
            journal.append(node_id, Step.STARTED, {"block": 1})
            journal.append(node_id, Step.PROPOSAL_STORED, {"proposal": {}, "cost_usd": 0.1})
            journal.append(node_id, Step.RUN_FINISHED, {"result": {"wall_s": seconds}})
            journal.append(node_id, Step.RECORDED, {"node": node.to_dict()})
        for node_id, verdict in ((3, "helped"), (4, "no effect")):
            journal.append_run_event(RunEvent.AB_RESULT, {"node": node_id, **compare(
                [1, 2], [0.5, 0.5], [0.6, 0.6] if verdict == "helped" else [0.5, 0.5],
                noise=0.0).to_dict()})


def test_every_figure_on_a_journal_with_known_answers(tmp_path):
    write_journal(tmp_path)
    with Journal.open_for_client(tmp_path) as journal:
        stats = run_stats(journal)
    assert (stats.nodes, stats.code_changes, stats.config_changes) == (6, 3, 2)
    assert (stats.code_ran_cleanly, stats.code_beat_parent) == (2, 1)
    assert (stats.code_ab_tested, stats.code_confirmed) == (2, 1)
    assert stats.code_success_rate == pytest.approx(1 / 3)
    assert stats.mean_gain_code == pytest.approx((0.1 - 0.05) / 2)  # the failed one has none
    assert stats.mean_gain_config == pytest.approx((0.2 + 0.1) / 2)
    assert [(k.kind, k.count) for k in stats.kinds] == [("training.learning_rate", 2),
                                                        ("[code] huber", 2)]
    assert stats.kinds[0].total_gain == pytest.approx(0.3)
    assert stats.kinds[1].total_gain == pytest.approx(0.05)
    assert stats.training_hours == pytest.approx(210 / 3600)
    assert (stats.best_r2, stats.r2_gained) == (pytest.approx(0.8), pytest.approx(0.3))
    assert stats.r2_points_per_hour == pytest.approx(30 / (210 / 3600))
    assert stats.agent_cost_usd == pytest.approx(0.6)
    assert stats.usd_per_r2_point == pytest.approx(0.6 / 30)


def test_a_run_without_code_changes_or_cost_says_none_not_zero(tmp_path):
    with Journal.open_for_engine(tmp_path) as journal:
        node = Node(1, None, config(1e-3), metrics={"final_r2": 0.4}, status=NodeStatus.DONE)
        journal.append(1, Step.RECORDED, {"node": node.to_dict()})
    with Journal.open_for_client(tmp_path) as journal:
        stats = run_stats(journal)
    assert stats.code_success_rate is None and stats.mean_gain_code is None
    assert stats.mean_gain_config is None and stats.kinds == ()
    assert stats.usd_per_r2_point is None and stats.r2_gained == 0.0


def test_a_changes_kind_is_its_template_or_its_keys():
    parent = {"training": {"learning_rate": 1e-3}, "model": {"hidden_dim": 64}}
    moved = Node(2, 1, {"training": {"learning_rate": 3e-3}, "model": {"hidden_dim": 128}})
    assert change_kind(moved, parent) == "model.hidden_dim, training.learning_rate"
    assert change_kind(Node(3, 1, parent), parent) == "baseline"
    coded = Node(4, 1, parent, code_changed=True, mutation="[code] huber loss")
    assert change_kind(coded, parent) == "[code] huber loss"
    described = Node(5, 1, parent, code_changed=True, mutation="clip gradients")
    assert change_kind(described, parent) == "[code] clip gradients"


def test_proctor_stats_prints_the_figures_and_json(tmp_path):
    project = tmp_path / "project"
    write_journal(project / "log" / "r1")

    def proctor(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tui.cli", *args], cwd=project,
                              capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})

    text = proctor("stats", "r1")
    assert text.returncode == 0, text.stderr
    assert "code changes: 2 ran cleanly, 1 beat their parent (33%), 1 of 2 A/B-tested " \
        "confirmed" in text.stdout
    assert "mean R2 gain over the parent: code +0.0250, config +0.1500" in text.stdout
    assert "agent cost $0.60, $0.020 per point of R2" in text.stdout
    figures = json.loads(proctor("stats", "r1", "--json").stdout)
    assert figures["kinds"][0] == {"kind": "training.learning_rate", "count": 2,
                                   "mean_gain": pytest.approx(0.15),
                                   "total_gain": pytest.approx(0.3)}
    missing = proctor("stats", "nope")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
