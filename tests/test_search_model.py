"""The offline agent's models: the encoding, the gain model's expected gain, the cost model's
fit and its guard against the timeouts, the ranking; and the whole agent on a synthetic
landscape shaped like the default experiment's (a learning rate that matters most, width and
frames per batch that help at a price)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Mapping
from typing import Any

import pytest
from test_heuristic import CONFIG, FPB, HIDDEN, LAYERS, LR, OMEGA, SPACE, get_dotted

from engine.agents.base import AgentContext, NodeSummary
from engine.agents.heuristic import HeuristicAgent
from engine.agents.search_model import (
    TIMEOUT_MARGIN,
    CostModel,
    Encoder,
    GainModel,
    Observed,
    compute_prior,
    one_key_values,
    rank_moves,
    same_value,
)
from engine.config import ExperimentConfig, ParamRange
from engine.memory import MEMORY_TEMPLATE
from engine.proposals import set_dotted

BASE = {LR: 1e-5, FPB: 4, HIDDEN: 64, LAYERS: 3, OMEGA: 30.0}


def point(**changes: Any) -> dict[str, Any]:
    names = {"lr": LR, "fpb": FPB, "hidden": HIDDEN, "layers": LAYERS, "omega": OMEGA}
    return BASE | {names[name]: value for name, value in changes.items()}


def seconds_of(values: Mapping[str, Any]) -> float:
    """Training time that grows like the SIREN's work: width^1.5, frames, depth."""
    return 10.0 * (values[HIDDEN] / 64) ** 1.5 * (values[FPB] / 4) * (values[LAYERS] / 3)


# -- encoding, values, gain ----------------------------------------------------------------------


def test_a_decade_of_learning_rate_is_as_far_as_the_whole_range_of_widths():
    encode = Encoder(SPACE)
    keys = encode.keys
    a, b = encode(point()), encode(point(lr=1e-4))
    assert math.isclose(b[keys.index(LR)] - a[keys.index(LR)], 1.0)
    widths = [encode(point(hidden=h))[keys.index(HIDDEN)] for h in (32, 64, 128, 256)]
    assert widths[0] == 0.0 and math.isclose(widths[-1], 1.0)
    assert encode({LR: 1e-5}) is None  # a missing key: not a point of the space


def test_one_key_values_stay_in_range_and_never_repeat_the_current_value():
    spec = ParamRange(low=1e-6, high=1e-2, log=True)
    values = one_key_values(spec, 3e-3)
    assert values and all(1e-6 <= v <= 1e-2 and not same_value(v, 3e-3) for v in values)
    assert sorted(values) == [1e-3, 1.5e-3, 2e-3, 4.5e-3, 6e-3, 9e-3]  # x and / 1.5, 2, 3
    pushed = one_key_values(spec, 3e-3, push=1)
    assert sorted(set(pushed) - set(values)) == [1e-2]  # x5 and x10 clipped to the top, once
    assert len(pushed) == len({f"{v:.6g}" for v in pushed})
    assert sorted(set(one_key_values(spec, 3e-3, push=-1)) - set(values)) == [3e-4, 6e-4]
    assert one_key_values(ParamRange(choices=[1, 2, 4]), 2) == [1, 4]
    assert one_key_values(ParamRange(low=2, high=5, integer=True), 3) == [4, 2]


def test_the_expected_gain_is_zero_for_a_sure_loss_and_grows_with_the_spread():
    model = GainModel(Encoder(SPACE), [Observed(point(), 0.90, 10.0)])
    sure_loss = model.expected_gain(mean=-math.log(0.2), sd=1e-6)  # R² 0.8, no doubt
    assert sure_loss == 0.0
    narrow, wide = model.expected_gain(-math.log(0.1), 0.1), model.expected_gain(
        -math.log(0.1), 1.0)
    assert 0 < narrow < wide < 0.1


def test_the_gain_model_prefers_where_the_results_point():
    observed = [Observed(point(lr=lr), r2, 10.0)
                for lr, r2 in ((1e-5, 0.5), (3e-5, 0.7), (1e-4, 0.85), (3e-4, 0.93))]
    model = GainModel(Encoder(SPACE), observed)
    (up, _), (down, _) = model.predict([point(lr=1e-3), point(lr=3e-6)])
    assert up > down


# -- cost ----------------------------------------------------------------------------------------


def test_one_finished_node_already_predicts_a_wider_model_dearer():
    cost = CostModel(SPACE, [Observed(point(), 0.6, 20.0)])
    same, _ = cost.predict(point(lr=1e-3))
    wider, _ = cost.predict(point(hidden=128))
    assert math.isclose(same, 20.0, rel_tol=1e-6)
    assert 2.0 < wider / same < 4.0  # the prior exponent 1.5 gives 2.83
    assert CostModel(SPACE, []).predict(point()) is None


def test_the_cost_model_learns_the_machines_exponents_from_the_runs():
    runs = [point(hidden=h, fpb=f) for h in (32, 64, 128) for f in (2, 4, 8)]
    cost = CostModel(SPACE, [Observed(v, 0.9, seconds_of(v)) for v in runs])
    predicted, upper = cost.predict(point(hidden=128, fpb=16))
    assert math.isclose(predicted, seconds_of(point(hidden=128, fpb=16)), rel_tol=0.15)
    assert upper > predicted


def test_beyond_the_largest_width_that_ran_the_upper_estimate_grows_at_least_quadratically():
    # widths 32 and 64 cost nearly the same (a fixed cost hides the growth): the fit alone
    # would call 256 cheap
    runs = [Observed(point(hidden=32), 0.6, 9.0), Observed(point(hidden=64), 0.6, 10.0),
            Observed(point(hidden=32, fpb=8), 0.6, 17.0), Observed(point(), 0.6, 10.5)]
    cost = CostModel(SPACE, runs)
    median, upper = cost.predict(point(hidden=256))
    assert upper >= 10.0 * 4.0 ** 2.0  # 16x the width-64 time at least


def test_a_move_expected_to_pass_the_wall_time_is_never_ranked():
    observed = [Observed(point(), 0.6, 20.0), Observed(point(lr=1e-4), 0.8, 20.0)]
    gain, cost = GainModel(Encoder(SPACE), observed), CostModel(SPACE, observed)
    changes = [{HIDDEN: 256}, {HIDDEN: 128}, {LR: 3e-4}]
    moves = rank_moves(gain, cost, point(lr=1e-4), changes, budget_left=1.0, wall_s=100.0)
    assert {HIDDEN: 256} not in [m.changes for m in moves]
    assert all(m.seconds_high <= TIMEOUT_MARGIN * 100.0 for m in moves)
    assert moves == sorted(moves, key=lambda m: -m.acquisition)


def test_a_dearer_move_must_promise_more_while_the_budget_is_young():
    observed = [Observed(point(), 0.6, 20.0), Observed(point(lr=1e-4), 0.8, 20.0)]
    gain, cost = GainModel(Encoder(SPACE), observed), CostModel(SPACE, observed)
    changes = [{HIDDEN: 256}]
    young = rank_moves(gain, cost, point(lr=1e-4), changes, budget_left=1.0, wall_s=None)[0]
    late = rank_moves(gain, cost, point(lr=1e-4), changes, budget_left=0.0, wall_s=None)[0]
    assert young.acquisition < late.acquisition == late.expected_gain


# -- the whole agent on a synthetic landscape ----------------------------------------------------


def landscape(values: Mapping[str, Any], rng: random.Random) -> float:
    """R² shaped like the default experiment: best learning rate near 1e-3, more frames and
    width help a little, omega_0 best near 30."""
    gap = ((math.log10(values[LR]) + 3) ** 2 - 3.0 - 0.6 * math.log2(values[FPB] / 4)
           - 0.13 * math.log2(values[HIDDEN] / 64) + {2: 0.4, 3: 0.0, 4: -0.1, 5: -0.05}[
               values[LAYERS]] + 0.0004 * (values[OMEGA] - 30) ** 2)
    return 1 - math.exp(gap) + rng.gauss(0, 0.002)


def explore(config: ExperimentConfig, iterations: int) -> list[NodeSummary]:
    """The offline agent run `iterations` times against `landscape`, scored as the tree would
    (best R² first among the finished nodes, as the score's exploit term)."""
    agent, rng, nodes, memory = HeuristicAgent(config), random.Random(0), [], MEMORY_TEMPLATE
    base = config.experiment_sections()
    wall = config.exploration.timeouts.wall_s
    for iteration in range(1, iterations + 1):
        block, in_block = (iteration - 1) // 12 + 1, (iteration - 1) % 12 + 1
        finished = sorted((n for n in nodes if n.status == "done"), key=lambda n: -n.r2)
        context = AgentContext(
            iteration=iteration, block=block, iteration_in_block=in_block, block_size=12,
            block_end=in_block == 12, instructions="", memory=memory, score_table="",
            config=config, nodes=tuple(nodes), candidates=tuple(n.id for n in finished))
        proposal = asyncio.run(agent.propose(context)).proposal
        memory = proposal.memory or memory
        sections = base if proposal.parent_id is None else next(
            n.config for n in nodes if n.id == proposal.parent_id)
        for key, value in proposal.config_changes.items():
            sections = set_dotted(sections, key, value)
        values = {key: get_dotted(sections, key) for key in SPACE}
        seconds = seconds_of(values)
        status = "done" if seconds < wall else "failed"
        metrics = {"final_r2": landscape(values, rng), "training_time_s": seconds}
        nodes.append(NodeSummary(
            id=iteration, parent_id=proposal.parent_id, block=block, status=status,
            strategy=proposal.strategy.value, mutation=proposal.mutation,
            code_changed=bool(proposal.edits), config_changes=dict(proposal.config_changes),
            config=sections, metrics=metrics if status == "done" else {}))
    return nodes


@pytest.fixture(scope="module")
def explored() -> tuple[ExperimentConfig, list[NodeSummary]]:
    timeouts = CONFIG.exploration.timeouts.model_copy(update={"wall_s": 200.0})
    config = CONFIG.model_copy(update={"exploration": CONFIG.exploration.model_copy(
        update={"timeouts": timeouts, "iterations": 12})})
    return config, explore(config, 12)


def test_the_agent_finds_the_learning_rate_first_and_a_near_fit_within_twelve(explored):
    _, nodes = explored
    best = max(n.r2 for n in nodes if n.status == "done")
    assert best >= 0.95, [(n.id, n.mutation, round(n.r2, 3)) for n in nodes]
    assert nodes[1].config_changes.keys() == {LR}  # the first move after the baseline


def test_the_agent_never_runs_past_the_wall_time_on_the_landscape(explored):
    config, nodes = explored
    wall = config.exploration.timeouts.wall_s
    assert all(n.status == "done" for n in nodes)
    assert max(n.metrics["training_time_s"] for n in nodes) < wall


def test_before_evidence_the_prior_expects_more_compute_to_fit_better():
    observed = [Observed(point(), 0.9, 20.0)]
    cost = CostModel(SPACE, observed)
    gain = GainModel(Encoder(SPACE), observed, prior=compute_prior(cost))
    (wider, _), (narrower, _), (same_cost, _) = gain.predict(
        [point(hidden=128), point(hidden=32), point(omega=40.0)])
    assert wider > same_cost > narrower
    assert compute_prior(CostModel(SPACE, [])) is None  # nothing ran: no prior


def test_a_node_with_a_value_that_is_no_finite_number_is_left_out_of_the_fit():
    observed = [Observed(point(), 0.6, 20.0), Observed(point(lr=math.inf), 0.9, 20.0),
                Observed(point(hidden=math.nan), 0.9, 20.0)]
    gain = GainModel(Encoder(SPACE), observed)
    assert gain.size == 1 and gain.best == 0.6
    ((mean, sd),) = gain.predict([point(lr=1e-4)])
    assert math.isfinite(mean) and sd > 0
