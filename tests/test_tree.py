"""The exploration tree: the original's worked scores, visits, blocks, candidates, the table."""

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.tree import (
    Node,
    NodeStatus,
    Tree,
    TreeError,
    block_of,
    block_span,
    puct_score,
    ucb1_score,
)

DONE = NodeStatus.DONE


def done(node_id, parent, r2, **fields):
    return Node(node_id, parent, {"lr": 1e-4}, metrics={"final_r2": r2}, status=DONE, **fields)


def test_worked_values_of_the_original():
    assert f"{puct_score(0.987, 1, 10, 1.414):.3f}" == "3.223"
    assert f"{puct_score(0.399, 10, 10, 1.414):.3f}" == "0.805"
    # The same numbers through a tree: node 1 has 9 descendants (V=10), node 10 is a leaf,
    # and the block holds N=10 nodes.
    tree = Tree(block_size=12, c=1.414)
    tree.add(done(1, None, 0.399))
    for node_id in range(2, 11):
        tree.add(done(node_id, node_id - 1, 0.5 if node_id < 10 else 0.987))
    assert tree.visits(1) == 10 and tree.visits(10) == 1
    assert f"{tree.score(10):.3f}" == "3.223"
    assert f"{tree.score(1):.3f}" == "0.805"


def test_ucb1_values_and_its_guards():
    assert ucb1_score(0.5, 4, 10, 1.414) == pytest.approx(0.5 + 1.414 * math.sqrt(math.log(10) / 4))
    assert f"{ucb1_score(0.5, 4, 10, 1.414):.3f}" == "1.573"
    assert ucb1_score(0.7, 1, 1, 1.414) == 0.7  # ln 1 = 0
    assert ucb1_score(0.7, 1, 0, 1.414) == 0.7  # no nodes yet
    tree = Tree(score="ucb1", c=2.0)
    tree.add(done(1, None, 0.6))
    tree.add(done(2, 1, 0.9))
    assert tree.score(1) == pytest.approx(0.6 + 2.0 * math.sqrt(math.log(2) / 2))


def test_nan_missing_and_diverged_score_as_zero():
    tree = Tree(c=1.0)
    tree.add(done(1, None, math.nan))
    tree.add(Node(2, 1, {}, status=DONE))  # no final_r2 at all
    tree.add(Node(3, 1, {}, metrics={"final_r2": 0.95}, status=NodeStatus.DIVERGED))
    n_block = 3
    assert tree.score(2) == pytest.approx(puct_score(0.0, 1, n_block, 1.0))
    assert tree.score(3) == pytest.approx(puct_score(0.0, 1, n_block, 1.0))
    assert tree.score(1) == pytest.approx(puct_score(0.0, 3, n_block, 1.0))
    by_id = {row.node_id: row for row in tree.rows()}
    assert math.isnan(by_id[1].r2) and by_id[3].r2 == 0.95  # shown as measured
    assert "R2=nan" in tree.render_score_table()


def test_pending_children_count_as_visits_at_once():
    tree = Tree(c=1.414)
    tree.add(done(1, None, 0.8))
    tree.add(done(2, 1, 0.8))
    before = tree.score(2, iteration=4)
    tree.add(Node(3, 2, {}))  # a parallel slot just took node 2 as parent
    assert tree.get(3).status is NodeStatus.PENDING
    assert tree.visits(2) == 2 and tree.visits(1) == 3
    assert tree.score(2, iteration=4) < before
    # Pending nodes are counted in N but are never parents.
    assert [row.node_id for row in tree.candidates()] == [2, 1]
    tree.update(3, status=NodeStatus.RUNNING)
    tree.update(3, status=DONE, metrics={"final_r2": 0.9})
    assert {row.node_id for row in tree.candidates()} == {1, 2, 3}


def test_block_boundaries_and_block_start_candidates():
    assert [block_of(i, 12) for i in (1, 12, 13, 24, 25)] == [1, 1, 2, 2, 3]
    assert block_span(16, 12) == (181, 192)
    tree = Tree(block_size=3, c=1.0)
    tree.add(done(1, None, 0.5))
    tree.add(done(2, 1, 0.9))
    tree.add(Node(3, 1, {}, status=NodeStatus.FAILED))
    assert tree.current_block() == 2  # the next iteration, 4, opens block 2
    # Block start: the best finished nodes overall, best first, scored by R2 alone (N=0).
    rows = tree.candidates()
    assert [row.node_id for row in rows] == [2, 1]
    assert [row.score for row in rows] == [0.9, 0.5]
    assert "block start" in tree.render_score_table()
    tree.add(done(4, 2, 0.7))
    tree.add(Node(5, 4, {}))
    # Inside a block: only this block's finished nodes, with N counting the pending one.
    assert [row.node_id for row in tree.candidates()] == [4]
    assert tree.score(4) == pytest.approx(0.7 + math.sqrt(2) / 3)
    assert [row.node_id for row in tree.rows()] == [4, 5]
    assert [node.block for node in tree] == [1, 1, 1, 2, 2]
    # Earlier blocks can still be scored on request.
    assert {row.node_id for row in tree.candidates(iteration=3)} == {1, 2}


def test_failed_nodes_are_never_candidates_nor_parents():
    tree = Tree(block_size=12)
    tree.add(done(1, None, 0.9))
    tree.add(Node(2, 1, {}, metrics={"final_r2": 0.99}, status=NodeStatus.FAILED))
    assert [row.node_id for row in tree.candidates()] == [1]
    assert [row.node_id for row in tree.candidates(iteration=13)] == [1]
    with pytest.raises(TreeError, match="parent 2 failed"):
        tree.add(Node(3, 2, {}))
    assert tree.best_node().id == 1


def test_score_table_text_in_the_original_format():
    tree = Tree(block_size=4, c=1.414)
    tree.add(
        Node(
            1,
            None,
            {},
            metrics={"final_r2": 0.5, "slope": 0.9, "training_time_s": 120.0},
            status=DONE,
            mutation="baseline",
        )
    )
    tree.add(
        Node(
            2,
            1,
            {},
            commit="abc123",
            code_changed=True,
            metrics={"final_r2": 0.81, "slope": 0.861, "training_time_s": 3552.0},
            status=DONE,
            mutation="Changed max_norm 0.5 -> 0.25",
        )
    )
    tree.add(Node(3, 2, {}, status=NodeStatus.FAILED, mutation="learning_rate: 1E-4 -> 5E-5"))
    assert tree.render_score_table() == (
        "=== UCB Scores (Block 1, iters 1-4, N=3, c=1.414) ===\n"
        "\n"
        "Node 2: UCB=1.626, parent=1, visits=2, R2=0.810, slope=0.861, time=59.2min "
        "[CODE] Changed max_norm 0.5 -> 0.25\n"
        "Node 3: UCB=1.225, parent=2, visits=1, R2=nan, slope=nan, time=nanmin "
        "[FAILED] learning_rate: 1E-4 -> 5E-5\n"
        "Node 1: UCB=1.112, parent=root, visits=3, R2=0.500, slope=0.900, time=2.0min baseline\n"
    )
    rows = tree.rows()
    assert (rows[0].node_id, rows[0].parent_id, rows[0].code_changed) == (2, 1, True)
    assert rows[1].status is NodeStatus.FAILED


def test_lineage_children_best_and_chain():
    tree = Tree()
    tree.add(done(1, None, 0.5))
    tree.add(done(2, 1, 0.7))
    tree.add(done(3, 2, 0.6))
    tree.add(Node(4, 3, {}, status=NodeStatus.FAILED))
    tree.add(done(5, 3, 0.65))
    assert [node.id for node in tree.lineage(5)] == [1, 2, 3, 5]
    assert [node.id for node in tree.children(3)] == [4, 5]
    assert tree.descendants_count(1) == 4
    assert tree.best_node().id == 2
    # The failed dead end does not break the chain 1-2-3-5.
    assert tree.tail_chain_length() == 4 and tree.chain_is_linear(4)
    tree.add(done(6, 2, 0.8))
    assert tree.tail_chain_length() == 1 and not tree.chain_is_linear()
    assert Tree().best_node() is None and Tree().tail_chain_length() == 0


def test_from_nodes_round_trip_through_json():
    tree = Tree(block_size=3)
    rng = random.Random(7)
    for node_id in range(1, 15):
        parent = None if node_id == 1 else rng.randint(1, node_id - 1)
        status = rng.choice([DONE, DONE, NodeStatus.DIVERGED, NodeStatus.PENDING])
        tree.add(
            Node(
                node_id,
                parent,
                {"training": {"learning_rate": rng.random()}},
                commit=f"c{node_id}" if node_id % 4 == 0 else None,
                code_changed=node_id % 4 == 0,
                metrics={"final_r2": rng.random(), "slope": math.nan},
                status=status,
                author=rng.choice(["agent", "human"]),
                strategy="exploit",
                mutation=f"m{node_id}",
            )
        )
    records = [json.loads(json.dumps(node.to_dict())) for node in tree]
    rng.shuffle(records)
    rebuilt = Tree.from_nodes((Node.from_dict(r) for r in records), block_size=3)
    assert rebuilt.render_score_table() == tree.render_score_table()
    # JSON text, because NaN != NaN as floats.
    assert [json.dumps(n.to_dict()) for n in rebuilt] == [json.dumps(n.to_dict()) for n in tree]
    assert [rebuilt.visits(n.id) for n in rebuilt] == [tree.visits(n.id) for n in tree]
    assert rebuilt.get(4).status is tree.get(4).status


def test_bad_nodes_are_refused_with_a_message():
    tree = Tree()
    with pytest.raises(TreeError, match="parent 9 is not in the tree"):
        tree.add(Node(1, 9, {}))
    tree.add(Node(1, None, {}))
    with pytest.raises(TreeError, match="already in the tree"):
        tree.add(Node(1, None, {}))
    with pytest.raises(TreeError, match="author"):
        tree.add(Node(2, 1, {}, author="robot"))
    with pytest.raises(TreeError, match="no node 7"):
        tree.get(7)
    with pytest.raises(TreeError, match="not a node record"):
        Node.from_dict({"id": 1, "parent_id": None, "config": {}, "colour": "red"})
    with pytest.raises(TreeError, match="unknown score"):
        Tree(score="ucb2")  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=60))
def test_incremental_visit_counts_match_a_recount(choices):
    tree = Tree()
    parents: dict[int, int | None] = {}
    for node_id, choice in enumerate(choices, start=1):
        parent = None if node_id == 1 or choice % 5 == 0 else 1 + choice % (node_id - 1)
        parents[node_id] = parent
        tree.add(Node(node_id, parent, {}))

    def recount(node_id: int) -> int:
        kids = [child for child, parent in parents.items() if parent == node_id]
        return len(kids) + sum(recount(kid) for kid in kids)

    assert all(tree.descendants_count(n) == recount(n) for n in parents)
