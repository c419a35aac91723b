"""The offline agent: the protocol's strategy table picks the parent, models pick the move.

The table (baseline, repair, block start, forced branch, switching a key, the code gate,
exploring a stalled block, re-test, exploit) and the slot roles decide where to build and
why. Which key and which value come from `engine.agents.search_model`: a Gaussian process
fitted to every node that ran, and a cost model of the training time, rank the one-key moves
(and, when exploiting, the recombinations with a good node of another branch) by expected
gain against extra cost; a move expected to pass the wall-time limit is never made, and the
analysis entry says what the chosen move is expected to gain and to cost. A re-test runs only
when the best node's lead over the best of another branch is inside the seed noise and no
move is expected to gain more. Principles enter memory.md from three agreeing observations
and none against, and are withdrawn when contradicted (`engine.agents.principles`).

Given the same config seed and the same history it returns the same proposal: the models are
deterministic, and all other chance comes from one `random.Random` derived from (seed,
iteration, repair attempt, rejections). Code changes come from the template library in
`engine.agents.templates`, tried only where their search text occurs exactly once in the
parent's files. Log text is never copied into the prose.

With parallel slots the other slots' unfinished proposals (`context.in_flight`) are planned
around: no (parent, key, value), identical run or code template of theirs is proposed again,
and a slot role (exploit, exploit_second, explore, challenge) picks the parent before the
strategy table does.
"""
from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from engine.agents.base import ROLE_MEANINGS, AgentContext, AgentReply, InFlight, NodeSummary
from engine.agents.principles import observations, principles, revise
from engine.agents.search_model import (
    CostModel,
    Encoder,
    GainModel,
    Move,
    Observed,
    compute_prior,
    direction_of,
    dotted_value,
    is_number,
    one_key_values,
    rank_moves,
    same_value,
)
from engine.agents.templates import TEMPLATES, CodeTemplate, template_of
from engine.config import ExperimentConfig, ParamRange
from engine.logs import format_number, one_line, quality_word
from engine.memory import (
    DO_NOT_RETRY,
    ITERATIONS,
    MEMORY_MAX_LINES,
    REGIME_HEADER,
    REGIME_TABLE,
    Memory,
    iteration_line,
)
from engine.proposal import Proposal, Strategy

# The protocol's thresholds, named after its wording.
CODE_GATE_BEST_R2_BELOW = 0.75  # "the best R2 of the block stayed < 0.75 ..."
CODE_GATE_POOR_ITERATIONS = 4  # "... for 4+ iterations"
CODE_GATE_PAST_ITERATION = 4  # "the block is past its 4th iteration"
GOOD_R2 = 0.90  # "a good node (R2 >= 0.90)"
ROBUST_R2_BAND = 0.02  # "a result within +-0.02 counts as robust"

# The model's part: how many nodes it is fitted to, and the noise before any re-test.
TREE_PARENTS = 3  # exploit weighs moves from this many parents by the tree's score ...
BEST_PARENTS = 2  # ... and from this many by R², so a fresh poor leaf cannot take the turn
MODEL_NODES_CAP = 200  # the best half and the latest half of this many: the fit stays fast
NOISE_PRIOR_R2 = 0.01  # R² spread over training seeds until a re-test measured it

SEED_KEY = "training.seed"
LEVEL_R2_BAND = 0.005  # a change this small reads as "level" in the prose
SLOPE_BIAS_BAND = 0.2  # |slope - 1| beyond this: the fit is biased

# memory.md: per-section caps keep the whole file under the protocol's 500 lines.
ITERATION_LINES_CAP = 150
LIST_SECTION_CAP = 60
OBSERVATION_LINES_CAP = 30
SUMMARY_LINES_CAP = 15

RunKey = tuple[Any, ...]  # a code signature and a sorted config: what a node ran
FINISHED = ("done", "diverged")
NOT_RUN = ("pending", "running")

# How a principle of memory.md says which way a key helps (the agent's own wording first).
UP_WORDS = ("raising", "raise", "increasing", "higher", "larger", "more")
DOWN_WORDS = ("lowering", "lower", "decreasing", "smaller", "fewer", "less")
HELPED_WORDS = ("helped", "helps", "improved", "improves")
HURT_WORDS = ("hurt", "hurts", "worsened", "worsens")


class HeuristicAgent:
    """Offline, deterministic agent; the default when no API key is configured."""

    name = "heuristic"

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config

    async def propose(self, context: AgentContext) -> AgentReply:
        """One proposal for this iteration, following the protocol's strategy table."""
        return decide(context, self.config)


# -- the history, read once per decision ---------------------------------------------------


@dataclass
class Avoid:
    """What must not be proposed again: (parent, key, value) triples and template names
    taken by proposals a human rejected in this iteration."""

    triples: list[tuple[int | None, str, Any]] = field(default_factory=list)
    templates: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Plan:
    """The decision before it is worded: table row, parent, change."""

    row: int
    strategy: Strategy
    parent_id: int | None
    parent_rule: str
    why: str
    hypothesis: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    template: CodeTemplate | None = None
    note: str = ""  # one extra sentence for the analysis
    do_not_retry: tuple[str, ...] = ()
    role: str | None = None  # the slot role that chose this plan (None: the table did)


def node_name(node_id: int | None) -> str:
    return "the base config" if node_id is None else f"node {node_id}"


def flight_template(flight: InFlight) -> CodeTemplate | None:
    """The library template an in-flight proposal applies (by its mutation or its change)."""
    template = template_of(flight.mutation)
    if template is None and flight.code_change is not None:
        template = next((t for t in TEMPLATES if t.change == flight.code_change), None)
    return template


def is_baseline(flight: InFlight) -> bool:
    return flight.parent_id is None and not flight.config_changes and flight.code_change is None


def _flatten(sections: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in sections.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class History:
    """The tree as the agent sees it, with the questions the strategy table asks of it."""

    def __init__(self, context: AgentContext, config: ExperimentConfig, avoid: Avoid) -> None:
        self.context = context
        self.config = config
        self.avoid = avoid
        self.space: dict[str, ParamRange] = dict(config.exploration.search_space)
        self.keys = sorted(self.space)
        self.by_id = {node.id: node for node in context.nodes}
        self.children: dict[int | None, list[NodeSummary]] = {}
        for node in sorted(context.nodes, key=lambda n: n.id):
            self.children.setdefault(node.parent_id, []).append(node)
        self.block_nodes = sorted(
            (n for n in context.nodes if n.block == context.block), key=lambda n: n.id
        )
        self._flat: dict[int | None, dict[str, Any]] = {}
        self._code: dict[int | None, tuple[str, ...]] = {}
        self.in_flight = context.in_flight
        # in-flight proposals that are not nodes yet (applied ones are children already)
        self.unapplied = tuple(f for f in context.in_flight if f.iteration not in self.by_id)
        # (code, config) identities of what ran or is proposed, with the seed and without
        self._run_indexes: dict[bool, tuple[set[RunKey], dict[RunKey, InFlight]]] = {}
        self.collisions: list[str] = []  # in-flight changes this plan stepped around
        self._models: dict[tuple[str, ...], tuple[GainModel, CostModel]] = {}
        self._noise: tuple[float, int] | None = None

    # nodes
    def parent(self, node: NodeSummary) -> NodeSummary | None:
        return self.by_id.get(node.parent_id) if node.parent_id is not None else None

    def lineage(self, node_id: int | None) -> list[NodeSummary]:
        """The node, its parent, ... up to the root."""
        chain: list[NodeSummary] = []
        seen: set[int] = set()
        while node_id is not None and node_id in self.by_id and node_id not in seen:
            seen.add(node_id)
            node = self.by_id[node_id]
            chain.append(node)
            node_id = node.parent_id
        return chain

    def is_ancestor(self, ancestor: NodeSummary, node: NodeSummary) -> bool:
        return any(n.id == ancestor.id for n in self.lineage(node.id))

    def common_ancestor(self, a: NodeSummary, b: NodeSummary) -> int | None:
        """The nearest node both descend from (None: the base config)."""
        ancestors = {n.id for n in self.lineage(a.id)}
        return next((n.id for n in self.lineage(b.id) if n.id in ancestors), None)

    def candidates(self) -> list[NodeSummary]:
        """Possible parents, best score first (the engine's list; else finished nodes by R2)."""
        listed = [self.by_id[i] for i in self.context.candidates if i in self.by_id]
        listed = [n for n in listed if n.status in FINISHED]
        if listed:
            return listed
        return sorted((n for n in self.context.nodes if n.status in FINISHED),
                      key=lambda n: (-n.r2, n.id))

    def comparable(self) -> list[NodeSummary]:
        """Finished nodes of the whole run in the candidates' regime, best R2 first: a block
        that keeps the regime may build on an earlier block's best, not only on its own."""
        candidates = self.candidates()
        regime = self.regime(candidates[0].id) if candidates else None
        return sorted((n for n in self.context.nodes
                       if n.status in FINISHED and self.regime(n.id) == regime),
                      key=lambda n: (-n.r2, n.id))

    def best_done(self, nodes: Iterable[NodeSummary]) -> NodeSummary | None:
        done = [n for n in nodes if n.status == "done"]
        return min(done, key=lambda n: (-n.r2, n.id)) if done else None

    def ran_block_nodes(self) -> list[NodeSummary]:
        return [n for n in self.block_nodes if n.status not in NOT_RUN]

    # config values
    def value(self, node_id: int | None, key: str) -> Any:
        """The value `key` had in the config that ran at `node_id` (None: the base config)."""
        if node_id is not None and node_id in self.by_id:
            try:
                return dotted_value(self.by_id[node_id].config, key)
            except KeyError:
                pass
        try:
            return self.config.value_at(key)
        except KeyError:
            return None

    def exists(self, parent_id: int | None, key: str, value: Any) -> bool:
        """True when (parent, key, value) is already a node or was rejected this iteration,
        or another slot has that key in flight from that parent, the same way."""
        for flight in self.in_flight:
            if flight.parent_id != parent_id or key not in flight.config_changes:
                continue
            theirs = flight.config_changes[key]
            if same_value(theirs, value) or self._same_way(parent_id, key, theirs, value):
                self.collide(flight, f"{key} -> {format_number(theirs)} from "
                                     f"{node_name(parent_id)}")
                return True
        for child in self.children.get(parent_id, []):
            if key in child.config_changes and same_value(child.config_changes[key], value):
                return True
        return any(p == parent_id and k == key and same_value(v, value)
                   for p, k, v in self.avoid.triples)

    def code_signature(self, node_id: int | None) -> tuple[str, ...]:
        """What the code at a node is made of: the templates (or, for other edits, the nodes)
        that changed it along the lineage; () is the base code."""
        if node_id not in self._code:
            parts = []
            for node in self.lineage(node_id):
                if node.code_changed:
                    template = template_of(node.mutation)
                    parts.append(template.name if template is not None else f"node {node.id}")
            self._code[node_id] = tuple(sorted(parts))
        return self._code[node_id]

    def flat_config(self, node_id: int | None) -> dict[str, Any]:
        """The config that ran at the node as dotted key -> value (None: the base config)."""
        if node_id not in self._flat:
            node = self.by_id.get(node_id) if node_id is not None else None
            sections = node.config if node is not None and node.config else \
                self.config.experiment_sections()
            self._flat[node_id] = dict(_flatten(sections))
        return self._flat[node_id]

    def taken(self, parent_id: int | None, changes: Mapping[str, Any]) -> bool:
        """True when a change repeats a (parent, key, value) already tried or rejected, or
        would rerun the config and code of an existing node (e.g. undoing a step) — but for
        the training seed, unless the change is the seed: a move from a node's seed re-run
        back to another node's config is a re-test by another name."""
        if not changes or any(self.exists(parent_id, k, v) for k, v in changes.items()):
            return True
        with_seed = SEED_KEY in changes
        ran, proposed = self._run_index(with_seed)
        flat = self.flat_config(parent_id) | dict(changes)
        run = self._run_key(parent_id, flat if with_seed else without_seed(flat))
        flight = proposed.get(run)
        if flight is not None:
            self.collide(flight, "the same config and code")
        return run in ran or flight is not None

    def _run_index(self, with_seed: bool) -> tuple[set[RunKey], dict[RunKey, InFlight]]:
        """The (code, config) identities of every node and of every unapplied in-flight config
        change, with the training seed or without it."""
        if with_seed not in self._run_indexes:
            def identity(node_id: int | None, flat: dict[str, Any]) -> RunKey:
                return self._run_key(node_id, flat if with_seed else without_seed(flat))

            ran = {identity(n.id, self.flat_config(n.id)) for n in self.context.nodes}
            proposed = {
                identity(f.parent_id, self.flat_config(f.parent_id) | dict(f.config_changes)): f
                for f in self.unapplied if f.code_change is None
            }
            self._run_indexes[with_seed] = ran, proposed
        return self._run_indexes[with_seed]

    def _same_way(self, parent_id: int | None, key: str, a: Any, b: Any) -> bool:
        """Both values step the search-space key the same way from the parent's: two slots
        trying lr x2 and lr x3 from one node spend a slot on nearly one question."""
        spec = self.space.get(key)
        if spec is None:
            return False
        old = self.value(parent_id, key)
        way = direction_of(spec, old, a)
        return way != 0 and way == direction_of(spec, old, b)

    def collide(self, flight: InFlight, what: str) -> None:
        """Note that the plan stepped around another slot's proposal (for the reasoning)."""
        line = f"{what} (iteration {flight.iteration}, slot {flight.slot})"
        if line not in self.collisions:
            self.collisions.append(line)

    def flights_at(self, node_id: int | None) -> list[InFlight]:
        """Unapplied in-flight proposals whose parent is `node_id`."""
        return [f for f in self.unapplied if f.parent_id == node_id]

    def visits(self, node_id: int) -> int:
        """Children of the node, the other slots' unapplied proposals on it included."""
        return len(self.children.get(node_id, [])) + len(self.flights_at(node_id))

    def seed_rerun(self, node_id: int) -> bool:
        """True when the node was re-run (or is being re-run) with only a new seed."""
        changes = [c.config_changes for c in self.children.get(node_id, [])]
        changes += [f.config_changes for f in self.flights_at(node_id) if f.code_change is None]
        return any(set(c) == {SEED_KEY} for c in changes)

    def _run_key(self, node_id: int | None, flat: Mapping[str, Any]) -> RunKey:
        """A hashable identity of (code, config); floats to 9 significant digits."""
        def norm(value: Any) -> Any:
            if isinstance(value, float):
                return float(f"{value:.9g}")
            if isinstance(value, list | tuple):
                return tuple(norm(v) for v in value)
            return value

        return self.code_signature(node_id), tuple(sorted((k, norm(v)) for k, v in flat.items()))

    def last_step(self, node_id: int | None, key: str) -> tuple[int, int]:
        """The way (+1 up, -1 down, 0 unchanged) the node's own step moved `key`, and what it
        did: +1 it left the node better than its parent by more than the seed noise, -1
        worse by more, 0 neither (or not known)."""
        node = self.by_id.get(node_id) if node_id is not None else None
        parent = self.parent(node) if node is not None else None
        if node is None or parent is None or key not in self.space:
            return 0, 0
        way = direction_of(self.space[key], self.value(parent.id, key), self.value(node.id, key))
        mine, theirs = self.observed(node).r2, self.observed(parent).r2
        if not way or mine is None or theirs is None:
            return way, 0
        noise = self.noise()[0]
        return way, 1 if mine > theirs + noise else -1 if mine < theirs - noise else 0

    def keys_tried_at(self, node_id: int | None) -> set[str]:
        tried = {k for child in self.children.get(node_id, []) for k in child.config_changes}
        return tried | {k for f in self.flights_at(node_id) for k in f.config_changes}

    def regime(self, node_id: int | None) -> tuple[Any, Any]:
        return self.value(node_id, "dataset.field"), self.value(node_id, "dataset.n_frames")

    # the models of the search space
    def space_values(self, node_id: int | None) -> dict[str, Any]:
        return {key: self.value(node_id, key) for key in self.keys}

    def observed(self, node: NodeSummary) -> Observed:
        """A node as the models see it: diverged scores 0, as the tree scores it; a failed
        node has no score but its training time, when it has one, still counts."""
        r2 = node.r2 if node.status == "done" else 0.0 if node.status == "diverged" else None
        seconds = node.metrics.get("training_time_s")
        finite = is_number(seconds) and math.isfinite(seconds) and seconds > 0
        return Observed(self.space_values(node.id), r2, seconds if finite else None)

    def models(self, parent_id: int | None) -> tuple[GainModel, CostModel]:
        """The gain model for moves from `parent_id`, fitted to the nodes that ran the
        parent's code when three or more did (else to every node that ran), and the cost
        model, fitted to every node that ran (a code change moves R² more than time)."""
        signature = self.code_signature(parent_id)
        if signature not in self._models:
            ran = [n for n in self.context.nodes if n.status not in NOT_RUN]
            same = [n for n in ran if self.code_signature(n.id) == signature]
            pool = _capped(same if len(same) >= 3 else ran)
            cost = CostModel(self.space, [self.observed(n) for n in _capped(ran)])
            gain = GainModel(Encoder(self.space), [self.observed(n) for n in pool],
                             seed=self.config.exploration.seed, prior=compute_prior(cost))
            self._models[signature] = gain, cost
        return self._models[signature]

    def seed_group(self, node: NodeSummary) -> list[NodeSummary]:
        """The finished nodes that ran the node's code and config but for the training seed."""
        key = self._seedless_key(node.id)
        return [n for n in self.context.nodes
                if n.status == "done" and self._seedless_key(n.id) == key]

    def _seedless_key(self, node_id: int) -> RunKey:
        return self._run_key(node_id, without_seed(self.flat_config(node_id)))

    def noise(self) -> tuple[float, int]:
        """The R² spread over training seeds (a standard deviation), pooled over every group
        of seed re-runs, with its degrees of freedom; `NOISE_PRIOR_R2` and 0 before any."""
        if self._noise is None:
            self._noise = self._measured_noise()
        return self._noise

    def _measured_noise(self) -> tuple[float, int]:
        groups: dict[RunKey, list[float]] = {}
        for node in self.context.nodes:
            if node.status == "done":
                groups.setdefault(self._seedless_key(node.id), []).append(node.r2)
        squares, freedom = 0.0, 0
        for values in groups.values():
            mean = sum(values) / len(values)
            squares += sum((value - mean) ** 2 for value in values)
            freedom += len(values) - 1
        if not freedom:
            return NOISE_PRIOR_R2, 0
        return max(math.sqrt(squares / freedom), 1e-4), freedom


def without_seed(flat: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if k != SEED_KEY}


def _capped(nodes: Sequence[NodeSummary]) -> list[NodeSummary]:
    """At most `MODEL_NODES_CAP` nodes: the best half by R² and the latest half."""
    if len(nodes) <= MODEL_NODES_CAP:
        return list(nodes)
    half = MODEL_NODES_CAP // 2
    chosen = {n.id: n for n in sorted(nodes, key=lambda n: (-n.r2, n.id))[:half]}
    for node in sorted(nodes, key=lambda n: -n.id):
        if len(chosen) >= MODEL_NODES_CAP:
            break
        chosen.setdefault(node.id, node)
    return sorted(chosen.values(), key=lambda n: n.id)


# -- the decision --------------------------------------------------------------------------


def derive_rng(seed: int, context: AgentContext) -> random.Random:
    """The decision's only source of chance: (seed, iteration, repair attempt, rejections)."""
    attempt = context.repair.attempt if context.repair is not None else 0
    return random.Random(
        f"proctor-heuristic:{seed}:{context.iteration}:{attempt}:{len(context.rejections)}"
    )


def decide(context: AgentContext, config: ExperimentConfig) -> AgentReply:
    """The whole decision: replay what was rejected (to avoid it), plan, then word it."""
    avoid = Avoid()
    rejected: list[tuple[Plan, str]] = []
    for count, reason in enumerate(context.rejections):
        earlier = replace(context, rejections=context.rejections[:count], repair=None)
        plan = Planner(earlier, config, avoid).plan()
        rejected.append((plan, reason))
        avoid.triples.extend((plan.parent_id, k, v) for k, v in plan.changes.items())
        if plan.template is not None:
            avoid.templates.add(plan.template.name)
    planner = Planner(context, config, avoid)
    plan = planner.plan()
    reply = word(planner.history, plan, rejected)
    if context.slots > 1 or context.in_flight:
        reasoning = "\n".join([*slot_lines(planner, plan), reply.reasoning])
        reply = replace(reply, reasoning=reasoning)
    return reply


class Planner:
    """Walks the strategy table top to bottom; the first row that yields a plan wins."""

    def __init__(self, context: AgentContext, config: ExperimentConfig, avoid: Avoid) -> None:
        self.context = context
        self.history = History(context, config, avoid)
        self.rng = derive_rng(config.exploration.seed, context)
        self.wall_s = config.exploration.timeouts.wall_s
        # the share of the run's iterations still to come: the cost's weight in a move's rank
        total = max(config.exploration.iterations, context.iteration)
        self.budget_left = (total - context.iteration + 1) / total
        self._files: dict[tuple[int | None, str], str] = {}
        self.role_miss = ""  # why the slot's role could not be followed, when it could not

    def plan(self) -> Plan:
        rows = (
            self.baseline,
            self.repair,
            self.no_finished_parent,
            self.by_role,
            self.block_start,
            self.code_modification,
            self.retest,
        )
        for row in rows:
            plan = row()
            if plan is not None:
                return plan
        return self.exploit()

    # helpers
    def _one_step(self, parent_id: int | None, keys: Sequence[str],
                  directions: Sequence[int] | None = None,
                  extra: Sequence[Mapping[str, Any]] = ()) -> Move | None:
        """The models' best move from the parent among the one-key moves of `keys` (only
        those going `directions`, when given) and the `extra` changes, leaving out what was
        tried, rejected or is in flight, a step further the way the parent's own step on that
        key hurt, and what would pass the wall-time limit; a step the way the parent's own
        step helped may be the protocol's bigger boundary probe."""
        h = self.history
        changes: list[Mapping[str, Any]] = []
        for key in keys:
            spec, old = h.space[key], h.value(parent_id, key)
            # a step that helped may go on by a bigger step; one that hurt goes no further
            before, outcome = h.last_step(parent_id, key)
            for value in one_key_values(spec, old, push=before if outcome > 0 else 0):
                way = direction_of(spec, old, value)
                if (directions and way not in directions) or (outcome < 0 and way == before):
                    continue
                if not h.taken(parent_id, {key: value}):
                    changes.append({key: value})
        changes += [change for change in extra if not h.taken(parent_id, change)]
        if not changes:
            return None
        gain, cost = h.models(parent_id)
        moves = rank_moves(gain, cost, h.space_values(parent_id), changes, self.budget_left,
                           self.wall_s)
        return moves[0] if moves else None

    def _some_step(self, parent_id: int | None, preferred: Sequence[str]) -> Move | None:
        """The best move on the `preferred` keys, else on any key."""
        return (self._one_step(parent_id, preferred) if preferred else None) or \
            self._one_step(parent_id, self.history.keys)

    def _read(self, node_id: int | None, path: str) -> str:
        if (node_id, path) not in self._files:
            try:
                text = self.context.read_file(node_id, path)
            except Exception:  # a file we cannot read is a template that does not apply
                text = ""
            self._files[(node_id, path)] = text if isinstance(text, str) else ""
        return self._files[(node_id, path)]

    def _excluded_templates(self) -> set[str]:
        """Templates already tried anywhere, in memory's Do not retry, or rejected."""
        names = set(self.history.avoid.templates)
        for node in self.context.nodes:
            template = template_of(node.mutation)
            if template is not None:
                names.add(template.name)
        settled = ("\n".join(Memory.parse(self.context.memory).body(DO_NOT_RETRY)) + "\n"
                   + "\n".join(self.context.rejections)).lower()
        for template in TEMPLATES:
            if template.name.lower() in settled or template.change.lower() in settled:
                names.add(template.name)
        for flight in self.history.in_flight:
            template = flight_template(flight)
            if template is not None:
                names.add(template.name)
        return names

    def _template_at(self, parent_id: int | None, excluded: set[str]) -> CodeTemplate | None:
        usable = [t for t in TEMPLATES
                  if t.name not in excluded and t.applies(self._read(parent_id, t.file))]
        for flight in self.history.in_flight:
            template = flight_template(flight)
            if template is not None and template.applies(self._read(parent_id, template.file)):
                self.history.collide(flight, f"{template.mutation} at {node_name(parent_id)}")
        return self.rng.choice(usable) if usable else None

    def _best_parent(self, parents: Sequence[NodeSummary],
                     move_at: Callable[[NodeSummary], Move | None],
                     ) -> tuple[NodeSummary, Move] | None:
        """Among `parents`, the one whose best move the models rank highest (the first of
        equals, in the order given)."""
        found = [(parent, move) for parent in parents if (move := move_at(parent)) is not None]
        if not found:
            return None
        return max(found, key=lambda item: item[1].acquisition)

    def _key_plan(self, row: int, strategy: Strategy, parent_id: int | None, rule: str,
                  why: str, move: Move, note: str = "", do_not_retry: tuple[str, ...] = (),
                  hypothesis: str = "") -> Plan:
        if not hypothesis:
            (key, value), = move.changes.items()
            hypothesis = key_hypothesis(self.history, key, self.history.value(parent_id, key),
                                        value)
        note = " ".join(part for part in (note, self._expectation(parent_id, move)) if part)
        return Plan(row, strategy, parent_id, rule, why, hypothesis, dict(move.changes),
                    note=note, do_not_retry=do_not_retry)

    def _expectation(self, parent_id: int | None, move: Move) -> str:
        """The analysis' sentence on what the models expect of the move."""
        gain, cost = self.history.models(parent_id)
        if gain.best is None:
            text = "No node has a score yet, so the model expects nothing of this move"
        else:
            text = (f"The model (a Gaussian process on {gain.size} scored nodes) expects R2 "
                    f"{move.predicted_r2:.3f} here, an expected gain of "
                    f"{move.expected_gain:+.4f} over the best {gain.best:.3f}")
        if move.seconds is not None and move.seconds_high is not None:
            text += (f"; training about {move.seconds:.0f} s (at most {move.seconds_high:.0f} s "
                     f"against the {self.wall_s:.0f} s limit; times of {cost.size} nodes)")
        return text + "."

    def _seed_plan(self, row: int, strategy: Strategy, parent: NodeSummary, rule: str,
                   why: str) -> Plan:
        h = self.history
        current = h.value(parent.id, SEED_KEY)
        seed = int(current) + 1 if isinstance(current, int) else 1
        while h.taken(parent.id, {SEED_KEY: seed}):
            seed += 1
        hypothesis = (f"Node {parent.id}'s result is robust: with training seed {seed} its R2 "
                      f"lands within +-{ROBUST_R2_BAND} of the original.")
        return Plan(row, strategy, parent.id, rule, why, hypothesis, {SEED_KEY: seed})

    def _default_parent(self) -> NodeSummary | None:
        candidates = self.history.candidates()
        return candidates[0] if candidates else None

    # row 1
    def baseline(self) -> Plan | None:
        if self.context.nodes:
            return None
        running = next((f for f in self.history.in_flight if is_baseline(f)), None)
        if running is not None:  # another slot measures the config as given: step a key
            self.history.collide(running, "the baseline")
            return None
        return Plan(1, Strategy.BASELINE, None, "Root (baseline: the config as given)",
                    "No node has run yet: measure the config as given.",
                    "The config as given trains to a finite R2 that sets the reference the "
                    "run's changes are measured against.")

    # row 2
    def repair(self) -> Plan | None:
        repair = self.context.repair
        if repair is None:
            return None
        h = self.history
        failed = repair.proposal
        parent = h.by_id.get(failed.parent_id) if failed.parent_id is not None else None
        if parent is not None and parent.status not in FINISHED:
            parent = None
        if parent is None:
            parent = self._default_parent()
        parent_id = parent.id if parent is not None else None
        crashed = any(n.id == self.context.iteration and n.status in ("failed", "diverged")
                      for n in self.context.nodes)
        kind = "crashed" if crashed else "was invalid"
        failed_name = failed.mutation or "the previous proposal"
        rule = (f"Node {parent_id} (same parent as the failed proposal)" if parent_id is not None
                else "Root (same parent as the failed proposal)")
        why = (f"The previous proposal ({failed_name}) {kind} (attempt {repair.attempt} of "
               f"{repair.max_attempts}): propose something different from the same parent.")
        lead = f"The proposed {failed_name} {kind}"
        if failed.edits:
            failed_templates = {t.name for t in TEMPLATES if t.mutation == failed.mutation
                                or set(t.edits) & set(failed.edits)}
            excluded = self._excluded_templates() | failed_templates
            notes = tuple(f"{name}: {'crashed' if crashed else 'invalid edit'} at node "
                          f"{parent_id} (attempt {repair.attempt}); do not retry it"
                          for name in sorted(failed_templates))
            template = None if self.context.rejections else self._template_at(parent_id, excluded)
            if template is not None:
                return Plan(2, Strategy.REPAIR, parent_id, rule, why, template.hypothesis,
                            template=template, do_not_retry=notes,
                            note=f"{lead}; replacing it with another template, "
                                 f"{template.name}.")
            step = self._one_step(parent_id, h.keys)
            if step is not None:
                return self._key_plan(2, Strategy.REPAIR, parent_id, rule,
                                      why + " No other template applies there: change config.",
                                      step, note=f"{lead}; falling back to a config-only change.",
                                      do_not_retry=notes)
        else:
            step = self._some_step(parent_id,
                                   [k for k in h.keys if k not in failed.config_changes])
            if step is not None:
                return self._key_plan(2, Strategy.REPAIR, parent_id, rule, why, step,
                                      note=f"{lead}; proposing a different config change.")
        if parent is not None:
            return self._seed_plan(2, Strategy.REPAIR, parent, rule,
                                   why + " Every step there is taken: re-run with a new seed.")
        return None

    # guard: nodes exist but none finished (e.g. the baseline failed)
    def no_finished_parent(self) -> Plan | None:
        if self.history.candidates():
            return None
        step = self._one_step(None, self.history.keys)
        if step is None:
            return None
        return self._key_plan(1, Strategy.EXPLORE, None, "Root (no finished node yet)",
                              "No node has finished yet: step one key of the config as given.",
                              step)

    # slot roles (parallel mode): they pick the parent before the table's rows 3-11 do
    def by_role(self) -> Plan | None:
        role = self.context.role
        if role is None:
            return None
        if not self.history.candidates():
            self.role_miss = "no node has finished yet"
            return None
        plan = {
            "exploit": lambda: self.role_exploit(0),
            "exploit_second": lambda: self.role_exploit(1),
            "explore": self.role_explore,
            "challenge": self.role_challenge,
        }[role]()
        return replace(plan, role=role) if plan is not None else None

    def role_exploit(self, rank: int) -> Plan:
        """The best (rank 0) or second-best candidate parent; the code gate's edit goes to
        the best one, so roles alone never shut code changes out."""
        candidates = self.history.candidates()
        if rank == 0:
            code = self.code_modification()
            if code is not None and code.parent_id == candidates[0].id:
                return code
        rank = min(rank, len(candidates) - 1)
        parent = candidates[rank]
        rule = f"Node {parent.id} ({'highest' if rank == 0 else 'second-highest'} score)"
        lead = "Exploit the " + ("best" if rank == 0 else "second-best") + " candidate parent"
        plan = self._exploit_at(parent, rule, lead)
        if plan is not None:
            return plan
        return self._seed_plan(11, Strategy.RETEST, parent, rule,
                               f"{lead}: every one-key step from node {parent.id} is taken or "
                               "in flight: re-test it with another seed.")

    def role_explore(self) -> Plan | None:
        """A less-visited candidate (not the best, which the exploit slot takes), on the key
        least changed so far among those untried there."""
        h = self.history
        candidates = h.candidates()
        pool = candidates[1:] or candidates
        ordered = sorted(pool, key=lambda n: (h.visits(n.id), candidates.index(n)))
        for parent in ordered:
            tried = h.keys_tried_at(parent.id)
            step = self._some_step(parent.id, [k for k in h.keys if k not in tried])
            if step is None:
                continue
            rank = candidates.index(parent) + 1
            keys = ", ".join(step.changes)
            return self._key_plan(
                8, Strategy.EXPLORE, parent.id,
                f"Node {parent.id} (explore: rank {rank} of {len(candidates)}, "
                f"{h.visits(parent.id)} children)",
                f"Node {parent.id} is among the least visited candidates below the best; the "
                f"model's best move there ({keys}) is on a key untried there where one has "
                "a move left.", step)
        self.role_miss = "every less-visited candidate's steps are taken or in flight"
        return None

    def role_challenge(self) -> Plan | None:
        """A step against a principle of memory.md: its key the other way from the way it
        says helps (or either way, for a key it says to hold), at the best candidate."""
        h = self.history
        parent = h.candidates()[0]
        lines = Memory.parse(self.context.memory).body("established principles")
        for line in (one_line(text, 200) for text in lines):
            for key, favoured in principle_keys(line, h.keys):
                step = self._one_step(parent.id, [key], [-favoured] if favoured else None)
                if step is None:
                    continue
                value = format_number(step.changes[key])
                hypothesis = (f"The principle \"{line.lstrip('- ')}\" does not hold at node "
                              f"{parent.id}: with {key} at {value}, R2 stays within "
                              f"+-{ROBUST_R2_BAND} of the parent's or rises.")
                return self._key_plan(
                    8, Strategy.EXPLORE, parent.id, f"Node {parent.id} (challenge a principle)",
                    f"Test a principle of memory.md by stepping {key} against it at the best "
                    "candidate.", step, hypothesis=hypothesis,
                    note=f"It challenges a principle of memory.md ({line.lstrip('- ')}).")
        self.role_miss = (f"no established principle of memory.md names a search-space key "
                          f"with a step left at node {parent.id}" if lines else
                          "memory.md has no established principle yet")
        return None

    # row 3
    def block_start(self) -> Plan | None:
        if self.context.iteration_in_block != 1 or self.context.block <= 1:
            return None
        h = self.history
        best = h.best_done(self.context.nodes) or self._default_parent()
        if best is None:
            return None
        step = self._one_step(best.id, h.keys)
        if step is None:
            return None
        field_name, n_frames = h.regime(best.id)
        note = (f"Block {self.context.block} keeps the regime (field {field_name}, n_frames "
                f"{n_frames}) so its results stay comparable with block {self.context.block - 1}.")
        return self._key_plan(
            3, Strategy.EXPLORE, best.id, f"Node {best.id} (best node so far, new block)",
            f"First iteration of block {self.context.block}: start from the best node so far, "
            "keeping the regime.", step, note=note)

    # row 7
    def code_modification(self) -> Plan | None:
        h = self.history
        if self.context.rejections or self.context.iteration_in_block <= CODE_GATE_PAST_ITERATION:
            return None
        ran = h.ran_block_nodes()
        best = h.best_done(ran)
        best_r2 = best.r2 if best is not None else 0.0
        # a code change is a new situation: the poor streak counts again from it (code stays rare)
        last_code = max((i for i, n in enumerate(ran) if n.code_changed), default=-1)
        since = len(ran) - 1 - last_code
        if since < CODE_GATE_POOR_ITERATIONS or best_r2 >= CODE_GATE_BEST_R2_BELOW:
            return None
        parent = best or self._default_parent()
        if parent is None or parent.status not in FINISHED:
            return None
        template = self._template_at(parent.id, self._excluded_templates())
        if template is None:
            return None
        return Plan(
            7, Strategy.CODE_CHANGE, parent.id, f"Node {parent.id} (best R2 of the block)",
            f"Code-change gate open: the block's best R2 stayed poor (below "
            f"{CODE_GATE_BEST_R2_BELOW}) over {since} runs, the block is past iteration "
            f"{CODE_GATE_PAST_ITERATION}, and '{template.name}' is untried and applies at node "
            f"{parent.id}.", template.hypothesis, template=template)

    # row 9
    def retest(self) -> Plan | None:
        """A re-test pays only when the best node's lead over the best node of another branch
        is inside the seed noise: one more seed decides which branch to build on. A rival on
        the best node's own line (its ancestor or descendant) is no such choice: one of the
        two carries the other's changes, so building on the best costs little either way."""
        h = self.history
        done = sorted((n for n in h.candidates() if n.status == "done"),
                      key=lambda n: (-n.r2, n.id))
        if len(done) < 2 or len(h.seed_group(done[0])) > 1:
            return None
        best = done[0]
        group = {n.id for n in h.seed_group(best)}
        rival = next((n for n in done[1:] if n.id not in group
                      and not h.is_ancestor(n, best) and not h.is_ancestor(best, n)), None)
        if rival is None or h.seed_rerun(best.id):
            return None
        noise, freedom = h.noise()
        gap = best.r2 - rival.r2
        if gap > noise:
            return None
        move = self._one_step(best.id, h.keys)
        if move is not None and move.expected_gain > noise:
            return None  # a move expected to gain more than the noise pays better
        measured = (f"measured over {freedom} re-run(s)" if freedom else
                    "assumed until a re-test measures it")
        expected = ("no move is left there" if move is None else
                    f"the best move there is expected to gain only {move.expected_gain:.4f}")
        return self._seed_plan(
            9, Strategy.RETEST, best, f"Node {best.id} (best, its lead inside the noise)",
            f"Node {best.id} leads node {rival.id} of another branch by {gap:.4f} R2, inside "
            f"the seed noise ({noise:.4f}, {measured}), and {expected}: one more training seed "
            "tells which branch to build on.")

    # row 10 (recombine) and row 11 (exploit): the models rank both kinds of move together
    def exploit(self) -> Plan:
        h = self.history
        candidates = h.candidates()
        # the best by R2 come from the whole run: a block whose first step went wrong still
        # builds on the best node of the blocks before it
        by_r2 = [n for n in h.comparable() if n.status == "done"]
        shortlist = list({n.id: n for n in candidates[:TREE_PARENTS] + by_r2[:BEST_PARENTS]}
                         .values())
        for parents in (shortlist, candidates):  # every candidate when the shortlist has no move
            found = self._best_parent(parents, lambda parent: self._exploit_move(parent)[0])
            if found is not None:
                parent, _ = found
                standing = (f"rank {candidates.index(parent) + 1} by score"
                            if parent in candidates else
                            f"R2 rank {by_r2.index(parent) + 1} of the run, block {parent.block}")
                rule = (f"Node {parent.id} ({standing}, R2 {quality_word(parent.r2)}; "
                        "the model expects most from it)")
                plan = self._exploit_at(parent, rule, "No earlier row matched")
                if plan is not None:
                    return plan
        parent = candidates[0] if candidates else None
        if parent is None:  # nothing finished and every root step taken: a fresh seed at root
            seed = h.value(None, SEED_KEY)
            seed = int(seed) + 1 if isinstance(seed, int) else 1
            while h.taken(None, {SEED_KEY: seed}):
                seed += 1
            return Plan(11, Strategy.RETEST, None, "Root (every step taken)",
                        "Every one-key step from the base config is taken: re-run it with a "
                        "new seed.", "A new training seed changes R2 by less than "
                        f"+-{ROBUST_R2_BAND}.", {SEED_KEY: seed})
        return self._seed_plan(11, Strategy.RETEST, parent, f"Node {parent.id} (highest score)",
                               "Every one-key step from every candidate is taken or expected "
                               "to pass the time limit: re-test the best one with another seed.")

    def _exploit_move(self, parent: NodeSummary,
                      ) -> tuple[Move | None, list[tuple[NodeSummary, dict[str, Any]]]]:
        """The models' best move at `parent` (a one-key step or a recombination), and the
        recombinations it was chosen among."""
        donors = self._recombinations(parent)
        return self._one_step(parent.id, self.history.keys, extra=[c for _, c in donors]), donors

    def _exploit_at(self, parent: NodeSummary, rule: str, lead: str) -> Plan | None:
        """The models' best move at `parent`: a one-key step, or the keys a good node of
        another branch changed (a recombination)."""
        step, donors = self._exploit_move(parent)
        if step is None:
            return None
        donor = next((other for other, changes in donors
                      if dict(changes) == dict(step.changes)), None)
        if donor is None:
            return self._key_plan(11, Strategy.EXPLOIT, parent.id, rule,
                                  f"{lead}: the model's best move from node {parent.id}.", step)
        keys = ", ".join(step.changes)
        return self._key_plan(
            10, Strategy.RECOMBINE, parent.id, f"Nodes {parent.id} + {donor.id} (recombine)",
            f"Nodes {parent.id} and {donor.id} are both good and in different branches, and the "
            f"model expects most of giving node {parent.id} the {keys} node {donor.id}'s branch "
            "changed.", step,
            hypothesis=f"Node {donor.id}'s {keys} add to node {parent.id}'s gains: the child "
                       "beats both.")

    def _recombinations(self, parent: NodeSummary) -> list[tuple[NodeSummary, dict[str, Any]]]:
        """For each good node of another branch: the search-space values its branch changed
        (since the common ancestor) that `parent`'s branch left as they were."""
        h = self.history
        found = []
        for other in sorted((n for n in h.candidates() if n.status == "done" and n.r2 >= GOOD_R2),
                            key=lambda n: (-n.r2, n.id)):
            if other.id == parent.id or h.is_ancestor(other, parent) \
                    or h.is_ancestor(parent, other):
                continue
            common = h.common_ancestor(parent, other)
            changes = {k: h.value(other.id, k) for k in h.keys
                       if not same_value(h.value(common, k), h.value(other.id, k))
                       and same_value(h.value(common, k), h.value(parent.id, k))}
            if changes and all(c != changes for _, c in found):
                found.append((other, changes))
        return found


def principle_keys(line: str, keys: Sequence[str]) -> list[tuple[str, int]]:
    """The search-space keys a principle names, each with the way it says helps: +1 up,
    -1 down, 0 when it does not say (e.g. "keep hidden_dim at 128")."""
    text = line.lower()
    named = [k for k in keys if k.lower() in text
             or re.search(rf"\b{re.escape(k.rsplit('.', 1)[-1].lower())}\b", text)]
    words = set(re.findall(r"[a-z]+", text))
    way = bool(words & set(UP_WORDS)) - bool(words & set(DOWN_WORDS))
    outcome = bool(words & set(HELPED_WORDS)) - bool(words & set(HURT_WORDS))
    favoured = way * outcome if len(named) == 1 else 0
    return [(key, favoured) for key in named]


# -- hypotheses ----------------------------------------------------------------------------

R2_RISES = "so R2 rises over the parent's"
# Why one step of a search-space key, (up, down), should move R2: a hypothesis' cause.
KEY_REASONS: dict[str, tuple[str, str]] = {
    "training.learning_rate": (
        "A larger learning rate lets the fixed training steps reach the sharp material jumps",
        "A smaller learning rate steadies the sine layers' training"),
    "training.frames_per_batch": (
        "More frames per batch give each step a smoother gradient over time",
        "Fewer frames per batch add gradient noise that helps escape the flat start"),
    "model.hidden_dim": (
        "A wider network has the capacity for the jumps between materials",
        "A narrower network fits as well with fewer parameters"),
    "model.n_layers": (
        "One more sine layer composes finer detail at the material boundaries",
        "One sine layer fewer trains further in the fixed steps"),
    "model.omega_0": (
        "A higher omega_0 resolves finer detail at the material boundaries",
        "A lower omega_0 smooths the fit and steadies training"),
}
# The steps whose hypothesis predicts something other than R2 rising over the parent's.
KEY_PREDICTIONS: dict[tuple[str, int], str] = {
    ("model.hidden_dim", -1): "R2 stays within 0.02 of the parent's",
}


def key_hypothesis(history: History, key: str, old: Any, new: Any) -> str:
    spec = history.space.get(key)
    direction = direction_of(spec, old, new) if spec is not None else 0
    reasons = KEY_REASONS.get(key)
    if reasons is not None and direction:
        reason = reasons[0] if direction > 0 else reasons[1]
        prediction = KEY_PREDICTIONS.get((key, direction))
        return f"{reason}: {prediction}." if prediction else f"{reason}, {R2_RISES}."
    way = "Raising" if direction > 0 else "Lowering"
    return (f"{way} {key} from {format_number(old)} to {format_number(new)} moves R2 by more "
            f"than the +-{ROBUST_R2_BAND} seed noise versus the parent.")


# -- wording: the proposal's prose and memory ----------------------------------------------


def mutation_text(history: History, plan: Plan) -> str:
    """`key: old -> new` in the original's number style, or `[code] name`."""
    if plan.template is not None:
        return plan.template.mutation
    if not plan.changes:
        return "none"
    return "; ".join(
        f"{key}: {format_number(history.value(plan.parent_id, key))} -> {format_number(value)}"
        for key, value in plan.changes.items()
    )


def latest_node(history: History) -> NodeSummary | None:
    ran = [n for n in history.context.nodes if n.status not in NOT_RUN]
    return max(ran, key=lambda n: n.id) if ran else None


def _biased(node: NodeSummary) -> bool:
    """A slope far from 1: the fit under- or over-shoots the amplitudes."""
    slope = node.metrics.get("slope")
    return is_number(slope) and math.isfinite(slope) and abs(slope - 1) > SLOPE_BIAS_BAND


def describe_latest(history: History) -> str:
    """1-2 sentences on the latest result against its parent, in quality words, no numbers."""
    node = latest_node(history)
    if node is None:
        return "No node has finished yet."
    what = node.mutation if node.mutation not in ("", "none") else "the config as given"
    if node.status == "failed":
        return f"Node {node.id} ({what}) failed to run; nothing builds on it."
    parent = history.parent(node)
    if node.status == "diverged":
        origin = f"from node {parent.id}" if parent is not None else "from the base config"
        return (f"Node {node.id} ({what}) diverged: it scores as 0 and that change is a dead "
                f"end {origin}.")
    quality = quality_word(node.r2)
    if parent is None or parent.status != "done":
        text = (f"Node {node.id} ({what}) is {quality}; it is the reference the next changes "
                "are measured against.")
    else:
        parent_quality = quality_word(parent.r2)
        delta = node.r2 - parent.r2
        if abs(delta) <= LEVEL_R2_BAND:
            verdict, reading = "level with", "the change made no real difference"
        elif delta > 0:
            verdict, reading = "better than", "the change helped"
        else:
            verdict, reading = "worse than", "the change hurt"
        text = (f"Node {node.id} ({what}) is {quality}, {verdict} its parent {parent.id} "
                f"({parent_quality}): {reading}.")
    if _biased(node) and (parent is None or not _biased(parent)):
        shot = "under" if node.metrics["slope"] < 1 else "over"
        text += f" Its slope is far from 1, so the fit is biased (amplitudes {shot}-shot)."
    return text


def flight_text(flight: InFlight) -> str:
    """One other slot's proposal in a line: what it changes, from where, in which state."""
    what = one_line(flight.mutation or flight.code_change or "the config as given", 120)
    return (f"iteration {flight.iteration} (slot {flight.slot}, {flight.status}): {what} from "
            f"{node_name(flight.parent_id)}")


def slot_lines(planner: Planner, plan: Plan) -> list[str]:
    """The reasoning's parallel part: slot and role, the other slots, what was stepped around."""
    context = planner.context
    role = context.role
    line = f"Slot {context.slot} of {context.slots}"
    if role is None:
        line += ", no role: the protocol's own choice."
    else:
        line += f", role {role} ({ROLE_MEANINGS[role]})."
        if plan.role is None and planner.role_miss:
            line += f" Not followed: {planner.role_miss}; the strategy table decided."
    lines = [line]
    if context.in_flight:
        lines.append("In flight in other slots: "
                     + "; ".join(flight_text(f) for f in context.in_flight) + ".")
        collisions = planner.history.collisions
        lines.append("Stepped around as in flight already: " + "; ".join(collisions) + "."
                     if collisions else "None of them collided with this plan.")
    return lines


def word(history: History, plan: Plan, rejected: Sequence[tuple[Plan, str]]) -> AgentReply:
    """The plan as a Proposal with the prose an LLM would write, plus the reasoning text."""
    context = history.context
    mutation = mutation_text(history, plan)
    analysis = describe_latest(history)
    if plan.note:
        analysis += " " + plan.note
    rejected_notes = tuple(
        f"{mutation_text(history, p)} from node {p.parent_id}: rejected by a human "
        f"({one_line(reason, 160) or 'no reason given'})" for p, reason in rejected
    )
    memory = compose_memory(history, plan, mutation, plan.do_not_retry + rejected_notes)
    template = plan.template
    proposal = Proposal(
        parent_id=plan.parent_id,
        strategy=plan.strategy,
        config_changes=dict(plan.changes),
        edits=template.edits if template is not None else (),
        code_change=template.code_change if template is not None else None,
        mutation=mutation,
        parent_rule=plan.parent_rule,
        hypothesis=plan.hypothesis,
        analysis=analysis,
        memory=memory,
    )
    attempt = context.repair.attempt if context.repair is not None else 0
    matched = f"Role {plan.role}" if plan.role is not None else f"Row {plan.row}"
    lines = [
        f"{matched} ({plan.strategy.value}) matched: {plan.why}",
        f"Parent: {plan.parent_rule}.",
        f"Change: {mutation}.",
        f"Hypothesis: {plan.hypothesis}",
    ]
    if rejected:
        lines.append(f"Avoiding what a human rejected this iteration: "
                     f"{'; '.join(mutation_text(history, p) for p, _ in rejected)}.")
    lines.append(f"Deterministic: seed {history.config.exploration.seed}, iteration "
                 f"{context.iteration}, attempt {attempt}, rejections {len(context.rejections)}.")
    return AgentReply(proposal=proposal, reasoning="\n".join(lines))


# -- memory.md -----------------------------------------------------------------------------

SECTION_CAPS = {
    "iterations": ITERATION_LINES_CAP,
    "observations": OBSERVATION_LINES_CAP,
    "previous block summary": SUMMARY_LINES_CAP,
    "established principles": LIST_SECTION_CAP,
    DO_NOT_RETRY: LIST_SECTION_CAP,
    "open questions": LIST_SECTION_CAP,
}
PREVIOUS_BLOCK_SUMMARY = "previous block summary"
LAST_PROPOSAL = "- Last proposal of the block: node "
CODE_CHANGES = "- Code changes"
CODE_CHANGES_SHOWN = 3


def cap_memory(memory: Memory) -> None:
    """Drop the oldest lines of the long-running lists, then anything over the line cap:
    first from the longest section a human or agent added, then from the longest list."""
    for key, limit in SECTION_CAPS.items():
        memory.set_body(key, memory.body(key)[-limit:])
    rows = memory.body(REGIME_TABLE)[len(REGIME_HEADER):]
    memory.set_body(REGIME_TABLE, [*REGIME_HEADER, *rows[-LIST_SECTION_CAP:]])
    excess = memory.line_count() - MEMORY_MAX_LINES
    while excess > 0:
        extras = [s for s in memory.sections if not s.in_skeleton and s.body]
        lists = [s for s in memory.sections if s.in_skeleton and s.key != REGIME_TABLE]
        longest = max(extras or lists, key=lambda s: len(s.body))
        if not longest.body:
            break
        longest.set_body(longest.body[1:])  # one line fewer: the section keeps its blank lines
        excess -= 1


def _config_summary(history: History, node: NodeSummary) -> str:
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={format_number(history.value(node.id, key))}"
                     for key in history.keys)


def _status_word(node: NodeSummary) -> str:
    return quality_word(node.r2) if node.status == "done" else node.status


def _ran_in_block(history: History, block: int) -> list[NodeSummary]:
    return [n for n in _block_nodes(history, block) if n.status not in NOT_RUN]


def _block_nodes(history: History, block: int) -> list[NodeSummary]:
    return sorted((n for n in history.context.nodes if n.block == block), key=lambda n: n.id)


def has_regime_row(memory: Memory, block: int) -> bool:
    return any(row.startswith(f"| {block} |") for row in memory.body(REGIME_TABLE))


def set_regime_row(history: History, memory: Memory, block: int) -> None:
    """The regime table's row for `block`, from the nodes of that block that have run."""
    best = history.best_done(_ran_in_block(history, block))
    field_name, n_frames = history.regime(best.id if best is not None else None)
    if best is not None:
        row = (f"| {block} | {field_name} | {n_frames} | {best.r2:.3f} ({best.id}) | "
               f"{_config_summary(history, best)} | {quality_word(best.r2)} |")
    else:
        row = f"| {block} | {field_name} | {n_frames} | - | - | failed |"
    rows = memory.body(REGIME_TABLE)
    index = next((i for i, r in enumerate(rows) if r.startswith(f"| {block} |")), None)
    if index is None:
        rows.append(row)
    else:
        rows[index] = row
    memory.set_body(REGIME_TABLE, rows)


def code_changes_line(history: History, block: int,
                      last_proposal: tuple[int, str] | None = None) -> str:
    """Every code change of the block, counted, with its outcome (`pending` until it ran),
    the block's last proposal (node id, mutation) included."""
    # A repair of the last iteration replaces its failed attempt: the proposal counts, not both.
    replaced = last_proposal[0] if last_proposal is not None else None
    changes = [f"node {n.id} {n.mutation} ({_status_word(n)})"
               for n in _block_nodes(history, block) if n.code_changed and n.id != replaced]
    if last_proposal is not None and template_of(last_proposal[1]) is not None:
        changes.append(f"node {last_proposal[0]} {last_proposal[1]} (pending)")
    if not changes:
        return f"{CODE_CHANGES}: none."
    shown = ", ".join(changes[:CODE_CHANGES_SHOWN])
    more = len(changes) - CODE_CHANGES_SHOWN
    return f"{CODE_CHANGES} ({len(changes)}): {shown}" + (f" and {more} more." if more > 0
                                                          else ".")


def settle_last_proposal(history: History, memory: Memory, block: int) -> None:
    """Next block's start: the previous block's last run has a result now; record it."""
    set_regime_row(history, memory, block)
    summary = memory.body(PREVIOUS_BLOCK_SUMMARY)
    for index, line in enumerate(summary):
        match = re.match(re.escape(LAST_PROPOSAL) + r"(\d+)", line)
        node = history.by_id.get(int(match.group(1))) if match else None
        if node is not None and node.status not in NOT_RUN:
            summary[index] = (f"- Last run of the block: node {node.id}, "
                              f"{node.mutation or 'no change'} ({_status_word(node)}).")
        elif line.startswith(CODE_CHANGES):
            summary[index] = code_changes_line(history, block)
    memory.set_body(PREVIOUS_BLOCK_SUMMARY, summary)


def _compared_with_parent(history: History, label: str,
                          changes: Iterable[tuple[float, NodeSummary]]) -> list[str]:
    """`- {label}: node N, mutation (parent's word -> node's word)` for up to four nodes."""
    return [f"- {label}: node {n.id}, {n.mutation or 'no change'} "
            f"({_status_word(history.parent(n))} -> {_status_word(n)})"
            for _, n in changes][:4]


def compress_block(history: History, memory: Memory, block: int,
                   last_proposal: tuple[int, str] | None = None) -> None:
    """Block end: regime row, principles, open questions, summary; Current Block cleared."""
    nodes = _ran_in_block(history, block)
    best = history.best_done(nodes)
    field_name, n_frames = history.regime(best.id if best is not None else None)
    set_regime_row(history, memory, block)

    worked: list[tuple[float, NodeSummary]] = []
    for node in nodes:
        parent = history.parent(node)
        if parent is not None and parent.status == "done" and node.status == "done":
            worked.append((node.r2 - parent.r2, node))
    if best is not None:
        questions = [f"- Does block {block}'s best config (node {best.id}) keep its lead on "
                     "another field or n_frames?"]
        if not any(set(c.config_changes) == {SEED_KEY}
                   for c in history.children.get(best.id, [])):
            questions.append(f"- Is node {best.id}'s result robust to the training seed?")
        memory.add_unique("open questions", questions)

    strategies: dict[str, int] = {}
    for node in nodes:
        strategies[node.strategy or "unknown"] = strategies.get(node.strategy or "unknown", 0) + 1
    worked.sort(key=lambda item: (-item[0], item[1].id))
    summary = [
        f"Block {block} (field {field_name}, n_frames {n_frames}): {len(nodes)} runs; best "
        + (f"node {best.id} ({quality_word(best.r2)}, R2 {best.r2:.3f})." if best is not None
           else "none (every run failed)."),
        "Strategies: " + ", ".join(f"{name} {count}" for name, count in sorted(strategies.items()))
        + ".",
    ]
    helped = _compared_with_parent(history, "Worked", (
        item for item in worked if item[0] > LEVEL_R2_BAND))
    hurt = _compared_with_parent(history, "Did not work", (
        item for item in reversed(worked) if item[0] < -LEVEL_R2_BAND))
    failed = [n for n in nodes if n.status in ("failed", "diverged")]
    summary += helped or ["- Worked: no change beat its parent."]
    summary += hurt or ["- Did not work: no change fell below its parent."]
    summary.append("- Failed or diverged: " + (", ".join(
        f"node {n.id} ({n.mutation or 'no change'})" for n in failed[:3]) or "none") + ".")
    summary.append(code_changes_line(history, block, last_proposal))
    if last_proposal is not None:
        summary.append(f"{LAST_PROPOSAL}{last_proposal[0]}, {last_proposal[1]} (its result "
                       f"opens block {block + 1}).")
    memory.set_body(PREVIOUS_BLOCK_SUMMARY, summary[:SUMMARY_LINES_CAP])
    next_from = f" from node {best.id} with its config" if best is not None else ""
    memory.set_body("info", [
        f"Next: block {block + 1}, same regime (field {field_name}, n_frames {n_frames})"
        f"{next_from}, so results stay comparable."
    ])
    for key in ("hypothesis", ITERATIONS, "observations"):
        memory.set_body(key, [])


def revise_principles(history: History, memory: Memory) -> None:
    """Established principles from the whole tree's evidence: three or more agreeing
    observations beyond the seed noise and none against; a contradicted one is withdrawn,
    with a note in the observations naming the evidence against it."""
    found = observations(history.context.nodes, history.space, history.noise()[0])
    held, contradicted = principles(found)
    lines, withdrawn = revise(memory.body("established principles"), held, contradicted)
    memory.set_body("established principles", lines)
    memory.add_unique("observations", withdrawn)


def compose_memory(history: History, plan: Plan, mutation: str,
                   do_not_retry: Sequence[str]) -> str:
    """The whole new memory.md: the Knowledge Base kept, this iteration's line appended, the
    block compressed at its end."""
    context = history.context
    memory = Memory.parse(context.memory).conformed()
    previous = context.block - 1
    if context.iteration_in_block == 1 and previous >= 1:
        if has_regime_row(memory, previous):
            settle_last_proposal(history, memory, previous)
        else:  # the last block's end was never compressed (skipped or rejected)
            compress_block(history, memory, previous)
    memory.add_unique(DO_NOT_RETRY, (f"- {one_line(note, 300)}" for note in do_not_retry))

    memory.settle_iterations({n.id: _status_word(n) for n in context.nodes
                              if n.status not in NOT_RUN})
    memory.append(ITERATIONS, iteration_line(context.iteration, plan.parent_id, mutation,
                                             plan.strategy.value))

    latest = latest_node(history)
    observations = []
    if latest is not None and latest.status in ("failed", "diverged"):
        observations.append(f"- Node {latest.id} {latest.status} ({latest.mutation or 'no change'}"
                            "); do not build on it.")
    elif latest is not None and latest.block == context.block and latest.status == "done":
        best = history.best_done(history.block_nodes)
        if best is not None and best.id == latest.id and len(history.ran_block_nodes()) > 1:
            observations.append(f"- Node {latest.id} is the block's best so far "
                                f"({quality_word(latest.r2)}): {latest.mutation or 'no change'}.")
    memory.add_unique("observations", observations)
    revise_principles(history, memory)

    field_name, n_frames = history.regime(plan.parent_id)
    memory.set_body("info", [
        f"Block {context.block}, regime: field {field_name}, n_frames {n_frames}.",
        f"Iteration {context.iteration_in_block} of {context.block_size} in this block "
        f"(run iteration {context.iteration}).",
    ])
    memory.set_body("hypothesis", [plan.hypothesis])
    if context.block_end:
        compress_block(history, memory, context.block, (context.iteration, mutation))
    cap_memory(memory)
    return memory.text()
