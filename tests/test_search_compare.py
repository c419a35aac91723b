"""The search benchmark's figures: taken at N iterations however far a run went, the held-out
R² of the node the search chose, and one clear message for a bad argument."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from engine.report import Curve
from engine.tree import Node, NodeStatus

BENCH = Path(__file__).resolve().parents[1] / "bench" / "search_compare.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_compare", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def a_curve() -> Curve:
    return Curve("tpe-s0", "optuna-tpe", iterations=(1, 5, 17, 20), hours=(0.1, 0.2, 0.5, 0.6),
                 best=(0.5, 0.9, 0.99, 0.995), last_iteration=24)


def test_a_run_that_went_further_is_read_as_it_stood_at_n(bench):
    at_12 = bench.up_to(a_curve(), 12)
    assert (at_12.iterations, at_12.hours, at_12.best) == ((1, 5), (0.1, 0.2), (0.5, 0.9))
    assert at_12.last_iteration == 12
    assert at_12.best_at(12) == 0.9 and at_12.best_at(24) is None
    assert bench.up_to(a_curve(), 30).best_at(24) == 0.995


def test_best_within_a_training_budget_and_time_to_a_target(bench):
    assert bench.best_within(a_curve(), 0.5) == 0.99
    assert bench.best_within(a_curve(), 0.05) is None
    assert bench.hours_to(a_curve(), 0.95) == 0.5
    assert bench.hours_to(a_curve(), 0.999) is None


def node(node_id: int, r2: float | None, heldout: float, status=NodeStatus.DONE) -> Node:
    metrics = {"heldout_r2": heldout} | ({"final_r2": r2} if r2 is not None else {})
    return Node(node_id, None, {}, metrics=metrics, status=status)


def test_the_held_out_r2_is_that_of_the_best_node_within_n_iterations(bench):
    nodes = [node(1, 0.90, 0.88), node(2, 0.97, 0.60), node(3, None, 0.0, NodeStatus.FAILED),
             node(4, 0.99, 0.95)]
    assert bench.heldout_of_best(nodes, 3) == 0.60
    assert bench.heldout_of_best(nodes, 4) == 0.95
    assert bench.heldout_of_best(nodes[2:3], 3) is None


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,x"], "--seeds takes whole numbers separated by commas, not '0,x'"),
    (["--methods", "heuristic,bayes"], "unknown method(s) ['bayes']"),
])
def test_a_bad_argument_gets_one_message_and_exit_2(bench, capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as stop:
        bench.main([*argv, "--report-only", "--root", str(tmp_path)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
