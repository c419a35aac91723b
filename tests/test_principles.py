"""Established principles only from consistent evidence: three or more agreeing observations,
none against, named on the line; a contradicted principle is withdrawn."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from engine.agents.base import NodeSummary
from engine.agents.principles import (
    Observation,
    Principle,
    observations,
    principles,
    revise,
)
from engine.config import ParamRange

LR = "training.learning_rate"
WIDTH = "model.hidden_dim"
ACTIVATION = "model.activation"
SPACE = {
    LR: ParamRange(low=1e-5, high=1e-1, log=True),
    WIDTH: ParamRange(low=16, high=512, integer=True),
    ACTIVATION: ParamRange(choices=["tanh", "relu", "sine"]),
}
BASE = {"training": {"learning_rate": 1e-3}, "model": {"hidden_dim": 128, "activation": "relu"}}
NOISE = 0.005


class Tree:
    """A hand-built tree of NodeSummary: node 1 is the root, each child changes its config."""

    def __init__(self, r2: float = 0.5) -> None:
        self.nodes: dict[int, NodeSummary] = {}
        self._add(1, None, {}, r2, "done", code=False)

    def child(self, parent: int, changes: dict[str, Any], r2: float | None,
              status: str = "done", code: bool = False) -> int:
        node_id = max(self.nodes) + 1
        self._add(node_id, parent, changes, r2, status, code)
        return node_id

    def _add(self, node_id: int, parent: int | None, changes: dict[str, Any],
             r2: float | None, status: str, code: bool) -> None:
        config = _nested(self.nodes[parent].config) if parent is not None else _nested(BASE)
        for dotted, value in changes.items():
            section, name = dotted.split(".")
            config[section][name] = value
        self.nodes[node_id] = NodeSummary(
            id=node_id, parent_id=parent, block=1, status=status, strategy="exploit",
            mutation=", ".join(f"{k}: {v}" for k, v in changes.items()), code_changed=code,
            config_changes=changes, config=config,
            metrics={"final_r2": r2} if r2 is not None else {})

    def observations(self) -> list[Observation]:
        return observations(list(self.nodes.values()), SPACE, NOISE)


def _nested(config: Any) -> dict[str, dict[str, Any]]:
    return {section: dict(values) for section, values in config.items()}


def raised_lr(tree: Tree, times: int, gain: float = 0.02) -> list[int]:
    """`times` children of the root that each raise the learning rate and gain `gain`."""
    return [tree.child(1, {LR: 1e-3 * (2 + i)}, 0.5 + gain) for i in range(times)]


def test_two_agreeing_observations_are_no_principle() -> None:
    tree = Tree()
    raised_lr(tree, 2)
    held, contradicted = principles(tree.observations())
    assert held == [] and contradicted == []


def test_three_agreeing_observations_are_one_principle_naming_them() -> None:
    tree = Tree()
    ids = raised_lr(tree, 3)
    held, contradicted = principles(tree.observations())
    assert contradicted == []
    assert [(p.key, p.favoured) for p in held] == [(LR, 1)]
    assert [o.node_id for o in held[0].supporting] == ids
    assert held[0].line() == (f"- Raising {LR} helps (3 agreeing, none against: "
                              f"nodes {ids[0]} +0.020, {ids[1]} +0.020, {ids[2]} +0.020)")


def test_lowering_that_hurt_supports_raising() -> None:
    tree = Tree()
    up = raised_lr(tree, 2, gain=0.316)
    down = tree.child(1, {LR: 1e-4}, 0.45)
    held, _ = principles(tree.observations())
    assert [(p.key, p.favoured) for p in held] == [(LR, 1)]
    assert held[0].line() == (f"- Raising {LR} helps (3 agreeing, none against: nodes "
                              f"{up[0]} +0.316, {up[1]} +0.316, {down} lowered -0.050)")


def test_one_observation_against_means_no_principle_and_a_contradiction() -> None:
    tree = Tree()
    raised_lr(tree, 3)
    against = tree.child(1, {LR: 0.05}, 0.419)  # raising hurt
    held, contradicted = principles(tree.observations())
    assert held == []
    by_way = {(c.key, c.favoured): [o.node_id for o in c.against] for c in contradicted}
    assert by_way[(LR, 1)] == [against]
    assert len(by_way[(LR, -1)]) == 3


def test_changes_within_the_noise_say_nothing() -> None:
    tree = Tree()
    raised_lr(tree, 3)
    tree.child(1, {LR: 0.05}, 0.496)  # raising "hurt", by less than the noise
    tree.child(1, {LR: 0.06}, 0.5 + NOISE / 2)
    assert len(tree.observations()) == 3
    held, contradicted = principles(tree.observations())
    assert [(p.key, p.favoured) for p in held] == [(LR, 1)] and contradicted == []


def test_multi_key_code_failed_and_diverged_nodes_are_no_evidence() -> None:
    tree = Tree()
    raised_lr(tree, 2)
    tree.child(1, {LR: 0.01, WIDTH: 256}, 0.6)  # two keys
    tree.child(1, {LR: 0.02}, 0.6, code=True)  # a code change
    tree.child(1, {LR: 0.03}, None, status="failed")
    tree.child(1, {LR: 0.04}, None, status="diverged")
    tree.child(1, {LR: 0.05}, None, status="done")  # done but no R2: not an R2 of 0
    tree.child(1, {"training.epochs": 9}, 0.9)  # not in the search space
    failed = tree.child(1, {WIDTH: 256}, None, status="failed")
    tree.child(failed, {LR: 0.06}, 0.9)  # its parent did not finish
    assert [o.key for o in tree.observations()] == [LR, LR]
    assert principles(tree.observations()) == ([], [])


def test_choices_go_up_and_down_in_the_order_of_the_choices() -> None:
    tree = Tree()
    ids = [tree.child(1, {ACTIVATION: "sine"}, 0.6) for _ in range(2)]  # relu -> sine: up
    ids.append(tree.child(1, {ACTIVATION: "tanh"}, 0.4))  # relu -> tanh: down, hurt
    found = tree.observations()
    assert [o.direction for o in found] == [1, 1, -1]
    held, _ = principles(found)
    assert [(p.key, p.favoured) for p in held] == [(ACTIVATION, 1)]
    assert "lowered -0.100" in held[0].line()


def test_the_evidence_list_is_capped() -> None:
    tree = Tree()
    ids = raised_lr(tree, 9)
    (principle,), _ = principles(tree.observations())
    line = principle.line()
    assert line.startswith(f"- Raising {LR} helps (9 agreeing, none against: nodes {ids[0]} ")
    assert line.endswith(f"{ids[5]} +0.020 and 3 more)")
    assert str(ids[6]) not in line.split("nodes", 1)[1].split("and")[0]


FOREIGN = [
    "- Keep hidden_dim at 128: wider nets were no better (Claude, block 2).",
    "- Raising training.learning_rate hurts on field B (human note).",
]


def test_revise_keeps_foreign_lines_and_adds_the_principle_after_them() -> None:
    tree = Tree()
    raised_lr(tree, 3)
    held, contradicted = principles(tree.observations())
    lines, notes = revise(FOREIGN, held, contradicted)
    assert lines == [*FOREIGN, held[0].line()] and notes == []


def test_revise_updates_its_own_line_with_the_current_evidence() -> None:
    tree = Tree()
    raised_lr(tree, 3)
    first, _ = principles(tree.observations())
    earlier = [FOREIGN[0], first[0].line(), FOREIGN[1]]
    raised_lr(tree, 1, gain=0.04)
    now, contradicted = principles(tree.observations())
    lines, notes = revise(earlier, now, contradicted)
    assert lines == [*FOREIGN, now[0].line()] and notes == []
    assert "4 agreeing" in lines[-1] and "+0.040" in lines[-1]


def test_revise_withdraws_a_contradicted_principle_and_names_the_evidence() -> None:
    tree = Tree()
    raised_lr(tree, 3)
    held, _ = principles(tree.observations())
    against = tree.child(1, {LR: 0.05}, 0.419)
    now, contradicted = principles(tree.observations())
    lines, notes = revise([*FOREIGN, held[0].line()], now, contradicted)
    # the human's free-text line says raising hurts: it is prose, and stays as written
    assert lines == FOREIGN
    assert notes == [f"- Withdrawn: raising {LR} helps (node {against} -0.081 against)"]


def test_revise_withdraws_the_offline_agents_weaker_older_lines() -> None:
    tree = Tree()
    raised_lr(tree, 3)
    (held,), _ = principles(tree.observations())
    old = [f"- Raising {LR} helped in block 1 (nodes 2, 3)",  # now held: rewritten
           f"- Lowering {WIDTH} hurt in block 1 (nodes 4, 5)"]  # no evidence now
    lines, notes = revise(old, [held], [])
    assert lines == [held.line()]
    assert notes == [f"- Withdrawn: raising {WIDTH} helps (too few agreeing observations)"]


def test_the_opposite_principle_withdraws_an_old_one() -> None:
    tree = Tree()
    ids = raised_lr(tree, 3)
    held, contradicted = principles(tree.observations())
    old = f"- Lowering {LR} helps (3 agreeing, none against: nodes 7 +0.010, 8 +0.010, 9 +0.020)"
    lines, notes = revise([old], held, contradicted)
    assert lines == [held[0].line()]
    assert notes == [f"- Withdrawn: lowering {LR} helps (nodes {ids[0]} raised +0.020, "
                     f"{ids[1]} raised +0.020, {ids[2]} raised +0.020 against)"]


def test_revise_of_its_own_output_with_the_same_evidence_is_the_same() -> None:
    tree = Tree()
    raised_lr(tree, 4)
    [tree.child(1, {WIDTH: 64}, 0.4) for _ in range(3)]  # lowering width hurt
    held, contradicted = principles(tree.observations())
    once, _ = revise(FOREIGN, held, contradicted)
    twice, notes = revise(once, held, contradicted)
    assert twice == once and notes == []
    assert once[len(FOREIGN):] == [p.line() for p in held]
    assert [p.key for p in held] == [WIDTH, LR]


# -- properties ----------------------------------------------------------------------------

KEYS = (LR, WIDTH, ACTIVATION)
found_observations = st.lists(
    st.tuples(st.sampled_from(KEYS), st.sampled_from((1, -1)),
              st.floats(min_value=-0.5, max_value=0.5).filter(lambda d: abs(d) > 1e-3)),
    max_size=30,
).map(lambda rows: [Observation(i + 2, 1, key, way, delta)
                    for i, (key, way, delta) in enumerate(rows)])


@given(found_observations, st.integers(min_value=1, max_value=5))
def test_no_principle_ever_has_an_observation_against_it(
        found: list[Observation], minimum: int) -> None:
    held, contradicted = principles(found, minimum)
    for principle in held:
        for_key = [o for o in found if o.key == principle.key]
        assert all(o.favours == principle.favoured for o in for_key)
        assert list(principle.supporting) == for_key and len(for_key) >= minimum
    both_ways = {o.key for o in found if any(
        p.key == o.key and p.favours == -o.favours for p in found)}
    assert {c.key for c in contradicted} == both_ways
    assert not both_ways & {p.key for p in held}


@given(found_observations, st.lists(st.sampled_from([
    *FOREIGN, "", f"- Raising {LR} helped in block 3 (nodes 4, 5)",
    f"- Lowering {WIDTH} helps (3 agreeing, none against: nodes 2 +0.100, 3 +0.100, 4 +0.100)",
]), max_size=6))
def test_revise_is_idempotent_and_keeps_every_foreign_line(
        found: list[Observation], existing: list[str]) -> None:
    held, contradicted = principles(found)
    once, _ = revise(existing, held, contradicted)
    twice, notes = revise(once, held, contradicted)
    assert twice == once and notes == []
    foreign = [line for line in existing if line in FOREIGN or not line]
    assert once == foreign + [p.line() for p in held]


def test_principle_lines_are_recognised_as_its_own() -> None:
    found = [Observation(n, 1, LR, 1, 0.01) for n in range(2, 12)]
    principle = Principle(LR, 1, tuple(found))
    lines, notes = revise([principle.line()], [], [])
    assert lines == [] and notes == [
        f"- Withdrawn: raising {LR} helps (too few agreeing observations)"]
