"""The offline agent with parallel slots: asked once per free slot, one slot after another,
with the other slots' unfinished proposals in its context, it never repeats one of them,
never builds on a node that has not finished, and follows the slot roles."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_heuristic import (
    CONFIG,
    FPB,
    HIDDEN,
    LAYERS,
    LR,
    OMEGA,
    History,
    draw_history,
    poor_block,
    with_seed,
)

from engine.agents.base import AgentContext, AgentReply, InFlight
from engine.agents.heuristic import HeuristicAgent, same_value
from engine.agents.templates import template_of
from engine.config import ExperimentConfig
from engine.logs import format_number
from engine.memory import MEMORY_TEMPLATE, Memory
from engine.proposal import Proposal, Strategy

ROLES = ("exploit", "exploit_second", "explore", "challenge")


def in_flight(reply: AgentReply, iteration: int, slot: int, status: str = "review",
              role: str | None = None) -> InFlight:
    """What the loop hands the next slot about this slot's proposal."""
    proposal = reply.proposal
    code = proposal.code_change.change if proposal.code_change is not None else None
    return InFlight(iteration, slot, proposal.parent_id, proposal.mutation,
                    dict(proposal.config_changes), code, status, role)


def ask(history: History, iteration: int, *, slot: int = 1, slots: int = 1,
        role: str | None = None, flights: tuple[InFlight, ...] = (),
        config: ExperimentConfig = CONFIG, **fields: Any) -> AgentReply:
    context: AgentContext = replace(history.context(iteration, config=config, **fields),
                                    slot=slot, slots=slots, role=role, in_flight=flights)
    return asyncio.run(HeuristicAgent(config).propose(context))


def fill_slots(history: History, first: int, roles: tuple[str | None, ...],
               config: ExperimentConfig = CONFIG, applied: tuple[bool, ...] = (),
               **fields: Any) -> list[AgentReply]:
    """One proposal per slot, serialised as the loop asks: slot s gets iteration first+s-1
    and sees the earlier slots' proposals in flight: waiting for review, or (`applied`) a
    running node of the tree."""
    replies: list[AgentReply] = []
    flights: list[InFlight] = []
    for slot, role in enumerate(roles, start=1):
        iteration = first + slot - 1
        reply = ask(history, iteration, slot=slot, slots=len(roles), role=role,
                    flights=tuple(flights), config=config, **fields)
        replies.append(reply)
        if slot <= len(applied) and applied[slot - 1]:
            proposal = reply.proposal
            history.add(iteration, proposal.parent_id, None, proposal.config_changes,
                        status="running", template=template_of(proposal.mutation))
            flights.append(in_flight(reply, iteration, slot, status="running", role=role))
        else:
            flights.append(in_flight(reply, iteration, slot, role=role))
    return replies


def duplicates(proposal: Proposal, flight: InFlight) -> bool:
    """Two slots running the same change: same parent and a shared (key, value), the same
    code change, or both the config as given."""
    if proposal.parent_id != flight.parent_id:
        return False
    if any(key in flight.config_changes and same_value(flight.config_changes[key], value)
           for key, value in proposal.config_changes.items()):
        return True
    code = proposal.code_change.change if proposal.code_change is not None else None
    if code is not None and code == flight.code_change:
        return True
    return (not proposal.config_changes and code is None and not flight.config_changes
            and flight.code_change is None)


def assert_no_duplicates(replies: list[AgentReply]) -> None:
    flights = [in_flight(r, i, i) for i, r in enumerate(replies, start=1)]
    for i, reply in enumerate(replies):
        for flight in flights[:i]:
            assert not duplicates(reply.proposal, flight), (reply.proposal, flight)


def dump(reply: AgentReply) -> str:
    return json.dumps(reply.proposal.model_dump(mode="json"), sort_keys=True)


# -- never the same change twice ------------------------------------------------------------


def test_a_slot_does_not_repeat_the_step_another_slot_has_in_flight():
    history = History().add(1, None, 0.78).add(2, 1, 0.85, {HIDDEN: 128})
    first = ask(history, 3, slot=1, slots=2)
    assert first.proposal.parent_id == 2
    ((key, value),) = first.proposal.config_changes.items()
    # without the other slot in its context, slot 2 would run the very same change
    blind = ask(history, 4, slot=2, slots=2)
    assert duplicates(blind.proposal, in_flight(first, 3, 1))

    second = ask(history, 4, slot=2, slots=2, flights=(in_flight(first, 3, 1),))
    assert not duplicates(second.proposal, in_flight(first, 3, 1))
    assert second.proposal.parent_id in (1, 2)
    lines = second.reasoning.splitlines()
    assert lines[0] == "Slot 2 of 2, no role: the protocol's own choice."
    assert lines[1] == ("In flight in other slots: iteration 3 (slot 1, review): "
                        f"{first.proposal.mutation} from node 2.")
    assert lines[2].startswith(f"Stepped around as in flight already: {key} -> "
                               f"{format_number(value)} from node 2 (iteration 3, slot 1)")


def test_two_slots_never_step_one_key_the_same_way_from_one_parent():
    history = History().add(1, None, 0.78).add(2, 1, 0.85, {OMEGA: 40.0})
    first = ask(history, 3, slot=1, slots=2)
    assert first.proposal.parent_id == 2
    ((key, value),) = first.proposal.config_changes.items()
    way = (value > history.nodes[2].config[key.split(".")[0]][key.split(".")[1]])
    second = ask(history, 4, slot=2, slots=2, flights=(in_flight(first, 3, 1),))
    change = second.proposal.config_changes
    if second.proposal.parent_id == 2 and key in change:
        old = history.nodes[2].config[key.split(".")[0]][key.split(".")[1]]
        assert (change[key] > old) != way


def test_four_slots_filled_one_after_another_all_differ():
    history = (History().add(1, None, 0.78).add(2, 1, 0.85, {HIDDEN: 128})
               .add(3, 1, 0.80, {LR: 3e-5}).add(4, 2, 0.86, {OMEGA: 40.0}))
    for roles in ((None,) * 4, ROLES, ("exploit",) * 4):
        replies = fill_slots(history, 5, roles)
        assert_no_duplicates(replies)
        changes = {(r.proposal.parent_id, r.proposal.mutation) for r in replies}
        assert len(changes) == 4, roles


def test_an_applied_proposal_still_running_is_neither_repeated_nor_a_parent():
    history = History().add(1, None, 0.78).add(2, 1, 0.85, {HIDDEN: 128})
    first = ask(history, 3, slot=1, slots=2)
    # the engine applied slot 1's proposal: node 3 is running, listed even among candidates
    history.add(3, 2, None, first.proposal.config_changes, status="running")
    flights = (in_flight(first, 3, 1, status="running"),)
    for role in (None, *ROLES):
        reply = ask(history, 4, slot=2, slots=2, role=role, flights=flights,
                    candidates=(3, 2, 1))
        assert reply.proposal.parent_id in (1, 2), role
        assert not duplicates(reply.proposal, flights[0]), role


def test_the_baseline_runs_once_while_another_slot_steps_a_key_of_the_config_as_given():
    history = History()
    replies = fill_slots(history, 1, (None, None, None), memory="")
    assert replies[0].proposal.strategy is Strategy.BASELINE
    for reply in replies[1:]:
        assert reply.proposal.parent_id is None and len(reply.proposal.config_changes) == 1
    assert_no_duplicates(replies)
    assert "the baseline (iteration 1, slot 1)" in replies[1].reasoning


def test_a_code_template_in_flight_is_not_proposed_again():
    history = poor_block()  # the code gate is open from node 5
    first = ask(history, 8, slot=1, slots=2)
    template = template_of(first.proposal.mutation)
    assert first.proposal.strategy is Strategy.CODE_CHANGE and template is not None
    second = ask(history, 9, slot=2, slots=2, flights=(in_flight(first, 8, 1),))
    assert template_of(second.proposal.mutation) is not template
    assert not duplicates(second.proposal, in_flight(first, 8, 1))
    assert f"{template.mutation} at node 5 (iteration 8, slot 1)" in second.reasoning


# -- slot roles -------------------------------------------------------------------------------


def ranked() -> History:
    """Good results (the code gate stays shut); by score: 4, 2, 3, 1, 5."""
    return (History().add(1, None, 0.80).add(2, 1, 0.86, {HIDDEN: 128})
            .add(3, 1, 0.83, {LR: 3e-5}).add(4, 2, 0.88, {OMEGA: 40.0})
            .add(5, 2, 0.79, {LAYERS: 4}))


CANDIDATES = (4, 2, 3, 1, 5)


def test_exploit_takes_the_best_candidate_and_exploit_second_the_next():
    history = ranked()
    best = ask(history, 6, slot=1, slots=2, role="exploit", candidates=CANDIDATES)
    assert best.proposal.parent_id == 4 and best.proposal.strategy is Strategy.EXPLOIT
    second = ask(history, 7, slot=2, slots=2, role="exploit_second", candidates=CANDIDATES,
                 flights=(in_flight(best, 6, 1, role="exploit"),))
    assert second.proposal.parent_id == 2 and second.proposal.strategy is Strategy.EXPLOIT
    assert second.reasoning.splitlines()[0] == (
        "Slot 2 of 2, role exploit_second (one step from the second-best candidate parent).")
    assert "Role exploit_second (exploit) matched: Exploit the second-best" in second.reasoning
    # the role holds on a chain too: the best candidate by score is its parent
    chain = (History().add(1, None, 0.60).add(2, 1, 0.70, {LR: 3e-5})
             .add(3, 2, 0.65, {HIDDEN: 128}).add(4, 3, 0.66, {LR: 1e-4}))
    assert ask(chain, 5, slots=2, role="exploit", candidates=(4, 2, 3, 1)).proposal.parent_id == 4


def test_two_exploit_slots_take_different_steps_from_the_best():
    history = ranked()
    replies = fill_slots(history, 6, ("exploit", "exploit"), candidates=CANDIDATES)
    assert [r.proposal.parent_id for r in replies] == [4, 4]
    assert_no_duplicates(replies)


def test_explore_leaves_the_best_and_goes_where_few_children_are():
    history = ranked()  # node 2 has two children, node 1 two, nodes 3, 4 and 5 none
    reply = ask(history, 6, slots=2, role="explore", candidates=CANDIDATES)
    assert reply.proposal.strategy is Strategy.EXPLORE
    assert reply.proposal.parent_id == 3  # the best-ranked of the childless, not the best (4)
    # one explore already in flight on node 3: the next goes to the next childless node
    nxt = ask(history, 7, slot=2, slots=2, role="explore", candidates=CANDIDATES,
              flights=(in_flight(reply, 6, 1, role="explore"),))
    assert nxt.proposal.parent_id == 5


def with_principle(line: str) -> str:
    memory = Memory.parse(MEMORY_TEMPLATE).conformed()
    memory.add_unique("established principles", [line])
    return memory.text()


def test_challenge_steps_a_principles_key_against_the_way_it_says_helps():
    history = ranked()
    memory = with_principle("- Raising model.hidden_dim helped in block 1 (nodes 2, 6)")
    reply = ask(history, 6, slots=2, role="challenge", candidates=CANDIDATES, memory=memory)
    assert reply.proposal.parent_id == 4
    assert reply.proposal.config_changes in ({HIDDEN: 64}, {HIDDEN: 32})  # down from 128
    assert "Raising model.hidden_dim helped" in reply.proposal.hypothesis
    assert "challenges a principle" in reply.proposal.analysis
    # a principle that says to hold a key: step it either way, never a no-op
    memory = with_principle("- Keep frames_per_batch at 4: it is settled (nodes 3, 5)")
    held = ask(history, 6, slots=2, role="challenge", candidates=CANDIDATES, memory=memory)
    assert set(held.proposal.config_changes) == {FPB}
    assert held.proposal.config_changes[FPB] != 4


def test_challenge_without_a_principle_says_so_and_follows_the_table():
    history = ranked()
    reply = ask(history, 6, slots=2, role="challenge", candidates=CANDIDATES)
    assert reply.proposal.parent_id in CANDIDATES
    assert "Not followed: memory.md has no established principle yet" in reply.reasoning


# -- determinism, and one slot unchanged ---------------------------------------------------------


def test_slot_plans_are_deterministic_given_the_seed():
    history = ranked()
    runs = [fill_slots(history, 6, ROLES, candidates=CANDIDATES) for _ in range(2)]
    assert [dump(r) for r in runs[0]] == [dump(r) for r in runs[1]]
    assert [r.reasoning for r in runs[0]] == [r.reasoning for r in runs[1]]


def test_one_slot_keeps_its_reasoning_without_slot_lines():
    reply = ask(ranked(), 6, candidates=CANDIDATES)
    assert not reply.reasoning.startswith("Slot") and "In flight" not in reply.reasoning


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_trees_filled_slot_by_slot_never_share_a_change_or_an_unfinished_parent(data):
    history, count = draw_history(data, max_nodes=12)
    roles = tuple(data.draw(st.lists(st.sampled_from((None, *ROLES)), min_size=2, max_size=4),
                            label="roles"))
    applied = tuple(data.draw(st.lists(st.booleans(), min_size=len(roles),
                                       max_size=len(roles)), label="applied"))
    seed = data.draw(st.integers(0, 3), label="seed")
    finished = {n.id for n in history.nodes.values() if n.status in ("done", "diverged")}
    replies = fill_slots(history, count + 1, roles, config=with_seed(seed), applied=applied)
    assert_no_duplicates(replies)
    for reply in replies:
        parent = reply.proposal.parent_id
        assert parent is None or parent in finished
