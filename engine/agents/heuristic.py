"""The offline agent: the protocol's strategy table, followed deterministically.

Given the same config seed and the same history it returns the same proposal: all chance
comes from one `random.Random` derived from (seed, iteration, repair attempt, rejections).
Config changes step one search-space key at a time inside its declared range; code changes
come from the template library in `engine.agents.templates`, tried only where their search
text occurs exactly once in the parent's files. Log text is never copied into the prose.

With parallel slots the other slots' unfinished proposals (`context.in_flight`) are planned
around: no (parent, key, value), identical run or code template of theirs is proposed again,
and a slot role (exploit, exploit_second, explore, challenge) picks the parent before the
strategy table does.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from engine.agents.base import ROLE_MEANINGS, AgentContext, AgentReply, InFlight, NodeSummary
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
FORCED_BRANCH_CHAIN_LENGTH = 4  # "the block's nodes form one chain, length >= 4"
SWITCH_AFTER_SAME_KEY_MUTATIONS = 4  # "the last 4 mutations along this lineage"
BOUNDARY_PROBE_SUCCESSES_IN_A_ROW = 3  # "3 successes in a row"
CODE_GATE_BEST_R2_BELOW = 0.75  # "the best R2 of the block stayed < 0.75 ..."
CODE_GATE_POOR_ITERATIONS = 4  # "... for 4+ iterations"
CODE_GATE_PAST_ITERATION = 4  # "the block is past its 4th iteration"
NO_IMPROVEMENT_ITERATIONS = 3  # "best R2 has not improved for 3 iterations"
GOOD_R2 = 0.90  # "a good node (R2 >= 0.90)"
RETEST_MIN_BLOCK_NODES = 6  # "the block has >= 6 nodes"
ROBUST_R2_BAND = 0.02  # "a result within +-0.02 counts as robust"

# Step sizes of Step 5.1.
LOG_STEP_FACTORS = (2.0, 3.0)  # "multiply or divide by 2-3"
BOUNDARY_PROBE_LOG_FACTOR = 10.0  # "(boundary-probe: 10)"
LINEAR_STEP_FRACTIONS = (0.2, 0.3, 0.4, 0.5)  # "+-20-50 %"
SIGNIFICANT_DIGITS = 3  # proposed floats read like a person typed them

SEED_KEY = "training.seed"
LEVEL_R2_BAND = 0.005  # a change this small reads as "level" in the prose
SLOPE_BIAS_BAND = 0.2  # |slope - 1| beyond this: the fit is biased

# memory.md: per-section caps keep the whole file under the protocol's 500 lines.
ITERATION_LINES_CAP = 150
LIST_SECTION_CAP = 60
OBSERVATION_LINES_CAP = 30
SUMMARY_LINES_CAP = 15

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


def same_value(a: Any, b: Any) -> bool:
    """Equality that treats 3e-05 and 3.0000000000000004e-05 as the same config value."""
    if _is_number(a) and _is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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


def dotted_value(sections: Mapping[str, Any], dotted: str) -> Any:
    """The value at `dotted` in nested mappings; KeyError when absent."""
    node: Any = sections
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


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
        self._runs: set[tuple[Any, ...]] | None = None
        self.in_flight = context.in_flight
        # in-flight proposals that are not nodes yet (applied ones are children already)
        self.unapplied = tuple(f for f in context.in_flight if f.iteration not in self.by_id)
        self._flight_runs: dict[tuple[Any, ...], InFlight] = {}
        self.collisions: list[str] = []  # in-flight changes this plan stepped around

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

    def is_success(self, node: NodeSummary) -> bool:
        """A child that ran and whose R2 is above its parent's."""
        parent = self.parent(node)
        return (node.status == "done" and parent is not None and parent.status in FINISHED
                and node.r2 > parent.r2)

    def candidates(self) -> list[NodeSummary]:
        """Possible parents, best score first (the engine's list; else finished nodes by R2)."""
        listed = [self.by_id[i] for i in self.context.candidates if i in self.by_id]
        listed = [n for n in listed if n.status in FINISHED]
        if listed:
            return listed
        return sorted((n for n in self.context.nodes if n.status in FINISHED),
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

    def single_key(self, node: NodeSummary) -> str | None:
        """The one config key this node changed (None for code changes and multi-key nodes)."""
        if node.code_changed or len(node.config_changes) != 1:
            return None
        return next(iter(node.config_changes))

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
        would rerun the exact config and code of an existing node (e.g. undoing a step)."""
        if not changes or any(self.exists(parent_id, k, v) for k, v in changes.items()):
            return True
        if self._runs is None:
            self._runs = {self._run_key(n.id, self.flat_config(n.id)) for n in self.context.nodes}
            self._flight_runs = {
                self._run_key(f.parent_id, self.flat_config(f.parent_id)
                              | dict(f.config_changes)): f
                for f in self.unapplied if f.code_change is None
            }
        run = self._run_key(parent_id, self.flat_config(parent_id) | dict(changes))
        flight = self._flight_runs.get(run)
        if flight is not None:
            self.collide(flight, "the same config and code")
        return run in self._runs or flight is not None

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

    def key_usage(self) -> dict[str, int]:
        """How often each key was changed across the tree and the in-flight proposals."""
        usage: dict[str, int] = {}
        for changes in [n.config_changes for n in self.context.nodes] + [
                f.config_changes for f in self.unapplied]:
            for key in changes:
                usage[key] = usage.get(key, 0) + 1
        return usage

    def _run_key(self, node_id: int | None, flat: Mapping[str, Any]) -> tuple[Any, ...]:
        """A hashable identity of (code, config); floats to 9 significant digits."""
        def norm(value: Any) -> Any:
            if isinstance(value, float):
                return float(f"{value:.9g}")
            if isinstance(value, list | tuple):
                return tuple(norm(v) for v in value)
            return value

        return self.code_signature(node_id), tuple(sorted((k, norm(v)) for k, v in flat.items()))

    def keys_tried_at(self, node_id: int | None) -> set[str]:
        tried = {k for child in self.children.get(node_id, []) for k in child.config_changes}
        return tried | {k for f in self.flights_at(node_id) for k in f.config_changes}

    def regime(self, node_id: int | None) -> tuple[Any, Any]:
        return self.value(node_id, "dataset.field"), self.value(node_id, "dataset.n_frames")


# -- stepping one parameter ----------------------------------------------------------------


def _round_significant(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    return float(f"{value:.{digits}g}") if value else 0.0


def _choice_index(choices: Sequence[Any], current: Any) -> int:
    for index, choice in enumerate(choices):
        if same_value(choice, current):
            return index
    numeric = [c for c in choices if isinstance(c, int | float) and not isinstance(c, bool)]
    if numeric and isinstance(current, int | float) and not isinstance(current, bool):
        nearest = min(numeric, key=lambda c: abs(float(c) - float(current)))
        return list(choices).index(nearest)
    return 0


def direction_of(spec: ParamRange, old: Any, new: Any) -> int:
    """+1 when the change went up (a later choice, a larger number), -1 when down, 0 level."""
    if spec.choices is not None:
        delta = _choice_index(spec.choices, new) - _choice_index(spec.choices, old)
    else:
        try:
            delta = float(new) - float(old)
        except (TypeError, ValueError):
            return 0
    return (delta > 0) - (delta < 0)


def step_value(spec: ParamRange, current: Any, direction: int, rng: random.Random,
               *, probe: bool = False) -> Any | None:
    """One protocol step of a value in `direction` (+1/-1), inside the range; None when the
    range leaves no room that way. `probe` takes the boundary-probe's bigger step."""
    if spec.choices is not None:
        choices = list(spec.choices)
        index = _choice_index(choices, current)
        target = (len(choices) - 1 if direction > 0 else 0) if probe else index + direction
        if not 0 <= target < len(choices) or same_value(choices[target], current):
            return None
        return choices[target]
    if isinstance(current, bool) or not isinstance(current, int | float):
        return None
    low, high = float(spec.low), float(spec.high)
    value = float(current)
    if spec.log:
        factor = BOUNDARY_PROBE_LOG_FACTOR if probe else rng.choice(LOG_STEP_FACTORS)
        base = value if value > 0 else low
        new = base * factor if direction > 0 else base / factor
    elif probe:
        new = high if direction > 0 else low
    else:
        fraction = rng.choice(LINEAR_STEP_FRACTIONS)
        size = abs(value) * fraction or (high - low) * fraction
        new = value + direction * size
    new = min(max(new, low), high)
    if spec.integer:
        stepped = int(round(new))
        if stepped == int(round(value)):
            stepped += direction
        if not low <= stepped <= high or same_value(stepped, value):
            return None
        return stepped
    new = min(max(_round_significant(new), low), high)
    return None if same_value(new, value) else new


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
        self._files: dict[tuple[int | None, str], str] = {}
        self.role_miss = ""  # why the slot's role could not be followed, when it could not

    def plan(self) -> Plan:
        rows = (
            self.baseline,
            self.repair,
            self.no_finished_parent,
            self.by_role,
            self.block_start,
            self.forced_branch,
            self.switch_parameter,
            self.boundary_probe,
            self.code_modification,
            self.explore_stagnation,
            self.retest,
            self.recombine,
        )
        for row in rows:
            plan = row()
            if plan is not None:
                return plan
        return self.exploit()

    # helpers
    def _shuffled(self, items: Iterable[Any]) -> list[Any]:
        ordered = list(items)
        self.rng.shuffle(ordered)
        return ordered

    def _one_step(self, parent_id: int | None, keys: Sequence[str],
                  directions: Sequence[int] | None = None) -> tuple[str, Any] | None:
        """The first (key, new value) among `keys` that stays in range and is new here."""
        h = self.history
        for key in keys:
            spec = h.space[key]
            for direction in directions or self._shuffled((1, -1)):
                value = step_value(spec, h.value(parent_id, key), direction, self.rng)
                if value is not None and not h.taken(parent_id, {key: value}):
                    return key, value
        return None

    def _preferring(self, preferred: Iterable[str]) -> list[str]:
        """All search-space keys, `preferred` ones first (each group shuffled)."""
        wanted = set(preferred)
        first = [k for k in self.history.keys if k in wanted]
        rest = [k for k in self.history.keys if k not in wanted]
        return self._shuffled(first) + self._shuffled(rest)

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

    def _key_plan(self, row: int, strategy: Strategy, parent_id: int | None, rule: str,
                  why: str, step: tuple[str, Any], note: str = "",
                  do_not_retry: tuple[str, ...] = ()) -> Plan:
        key, value = step
        old = self.history.value(parent_id, key)
        return Plan(row, strategy, parent_id, rule, why, key_hypothesis(self.history, key, old,
                    value), {key: value}, note=note, do_not_retry=do_not_retry)

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
            step = self._one_step(parent_id, self._shuffled(h.keys))
            if step is not None:
                return self._key_plan(2, Strategy.REPAIR, parent_id, rule,
                                      why + " No other template applies there: change config.",
                                      step, note=f"{lead}; falling back to a config-only change.",
                                      do_not_retry=notes)
        else:
            step = self._one_step(parent_id, self._preferring(
                k for k in h.keys if k not in failed.config_changes))
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
        step = self._one_step(None, self._shuffled(self.history.keys))
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
        usage = h.key_usage()
        for parent in ordered:
            tried = h.keys_tried_at(parent.id)
            keys = sorted(self._shuffled(h.keys), key=lambda k: (k in tried, usage.get(k, 0)))
            step = self._one_step(parent.id, keys)
            if step is None:
                continue
            rank = candidates.index(parent) + 1
            return self._key_plan(
                8, Strategy.EXPLORE, parent.id,
                f"Node {parent.id} (explore: rank {rank} of {len(candidates)}, "
                f"{h.visits(parent.id)} children)",
                f"Node {parent.id} is among the least visited candidates below the best; "
                f"{step[0]} is the least changed key untried there.", step)
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
                value = format_number(step[1])
                hypothesis = (f"The principle \"{line.lstrip('- ')}\" does not hold at node "
                              f"{parent.id}: with {key} at {value}, R2 stays within "
                              f"+-{ROBUST_R2_BAND} of the parent's or rises.")
                return Plan(
                    8, Strategy.EXPLORE, parent.id, f"Node {parent.id} (challenge a principle)",
                    f"Test a principle of memory.md by stepping {key} against it at the best "
                    "candidate.", hypothesis, dict([step]),
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
        step = self._one_step(best.id, self._preferring(
            k for k in h.keys if k not in h.keys_tried_at(best.id)))
        if step is None:
            return None
        field_name, n_frames = h.regime(best.id)
        note = (f"Block {self.context.block} keeps the regime (field {field_name}, n_frames "
                f"{n_frames}) so its results stay comparable with block {self.context.block - 1}.")
        return self._key_plan(
            3, Strategy.EXPLORE, best.id, f"Node {best.id} (best node so far, new block)",
            f"First iteration of block {self.context.block}: start from the best node so far, "
            "keeping the regime.", step, note=note)

    # row 4
    def forced_branch(self) -> Plan | None:
        h = self.history
        chain = h.block_nodes
        if len(chain) < FORCED_BRANCH_CHAIN_LENGTH:
            return None
        if any(chain[i].parent_id != chain[i - 1].id for i in range(1, len(chain))):
            return None
        tip = chain[-1]
        parents = sorted((n for n in chain[:-1] if n.status == "done"), key=lambda n: (-n.r2, n.id))
        touched = [k for n in chain for k in n.config_changes]
        untouched = [k for k in h.keys if k not in touched]
        keys = self._shuffled(untouched) + sorted(
            (k for k in h.keys if k not in untouched), key=lambda k: (touched.count(k), k))
        for parent in parents:
            step = self._one_step(parent.id, keys)
            if step is not None:
                return self._key_plan(
                    4, Strategy.FORCED_BRANCH, parent.id,
                    f"Node {parent.id} (forced branch off chain {chain[0].id}-{tip.id})",
                    f"The block's {len(chain)} nodes form one chain "
                    f"({'-'.join(str(n.id) for n in chain)}) with no branch: branch off a "
                    "good node that is not the tip, on a key the chain did not touch.", step)
        return None

    # row 5
    def switch_parameter(self) -> Plan | None:
        h = self.history
        parent = self._default_parent()
        if parent is None:
            return None
        recent = h.lineage(parent.id)[:SWITCH_AFTER_SAME_KEY_MUTATIONS]
        keys = [h.single_key(n) for n in recent]
        if (len(keys) < SWITCH_AFTER_SAME_KEY_MUTATIONS or keys[0] is None
                or keys[0] not in h.space or any(k != keys[0] for k in keys)):
            return None
        repeated = keys[0]
        lineage_keys = {k for n in h.lineage(parent.id) for k in n.config_changes}
        others = [k for k in h.keys if k != repeated]
        order = self._shuffled(k for k in others if k not in lineage_keys) + self._shuffled(
            k for k in others if k in lineage_keys)
        step = self._one_step(parent.id, order)
        if step is None:
            return None
        ids = ", ".join(str(n.id) for n in recent)
        return self._key_plan(
            5, Strategy.SWITCH_PARAMETER, parent.id, f"Node {parent.id} (highest score)",
            f"The last {len(recent)} mutations along node {parent.id}'s lineage (nodes {ids}) "
            f"all changed {repeated}: switch to another key.", step)

    # row 6
    def boundary_probe(self) -> Plan | None:
        h = self.history
        parent = self._default_parent()
        if parent is None:
            return None
        streak = h.lineage(parent.id)[:BOUNDARY_PROBE_SUCCESSES_IN_A_ROW]
        if len(streak) < BOUNDARY_PROBE_SUCCESSES_IN_A_ROW or not all(
                h.is_success(n) for n in streak):
            return None
        for node in streak:
            key = h.single_key(node)
            if key is None or key not in h.space:
                continue
            spec = h.space[key]
            direction = direction_of(spec, h.value(node.parent_id, key), h.value(node.id, key))
            if direction == 0:
                continue
            old = h.value(parent.id, key)
            value = step_value(spec, old, direction, self.rng, probe=True)
            if value is None or h.taken(parent.id, {key: value}):
                return None
            ids = ", ".join(str(n.id) for n in streak)
            way = "up" if direction > 0 else "down"
            hypothesis = (f"Pushing {key} further {way}, to {format_number(value)}, finds where "
                          f"it stops helping: R2 falls below node {parent.id}'s there.")
            return Plan(6, Strategy.BOUNDARY_PROBE, parent.id, f"Node {parent.id} (highest score)",
                        f"Nodes {ids} each beat their parent ({len(streak)} successes in a row) "
                        f"and {key} kept helping going {way}: probe toward the edge of its range.",
                        hypothesis, {key: value})
        return None

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

    # row 8
    def explore_stagnation(self) -> Plan | None:
        h = self.history
        ran = h.ran_block_nodes()
        if len(ran) <= NO_IMPROVEMENT_ITERATIONS:
            return None
        scores = [n.r2 if n.status == "done" else 0.0 for n in ran]
        best_index = scores.index(max(scores))
        if len(ran) - 1 - best_index < NO_IMPROVEMENT_ITERATIONS:
            return None
        chain = {n.id for n in h.lineage(h.block_nodes[-1].id)}
        candidates = [n for n in h.candidates() if n.status == "done"]
        off_chain = [n for n in candidates if n.id not in chain]
        pool = off_chain or [n for n in candidates if n.id != h.block_nodes[-1].id]
        if not pool:
            return None
        # a mid-scored node: the best one was exploited already
        ordered = pool[len(pool) // 2:] + pool[:len(pool) // 2]
        for parent in ordered:
            step = self._one_step(parent.id, self._preferring(
                k for k in h.keys if k not in h.keys_tried_at(parent.id)))
            if step is not None:
                where = "off the recent chain" if parent in off_chain else "mid-scored"
                return self._key_plan(
                    8, Strategy.EXPLORE, parent.id, f"Node {parent.id} ({where})",
                    f"The block's best R2 (node {ran[best_index].id}) has not improved for "
                    f"{len(ran) - 1 - best_index} iterations: explore from another branch, on "
                    "a key untried there.", step)
        return None

    # row 9
    def retest(self) -> Plan | None:
        h = self.history
        if len(h.block_nodes) < RETEST_MIN_BLOCK_NODES:
            return None
        for node in sorted(h.candidates(), key=lambda n: (-n.r2, n.id)):
            if node.status != "done" or node.r2 < GOOD_R2 or node.strategy == Strategy.RETEST:
                continue
            if h.seed_rerun(node.id):
                continue
            return self._seed_plan(
                9, Strategy.RETEST, node, f"Node {node.id} (good, never re-run)",
                f"Node {node.id} is {quality_word(node.r2)} and was never re-run, and the block "
                f"has {len(h.block_nodes)} nodes: re-test it with another training seed.")
        return None

    # row 10
    def recombine(self) -> Plan | None:
        h = self.history
        good = sorted((n for n in h.candidates() if n.status == "done" and n.r2 >= GOOD_R2),
                      key=lambda n: (-n.r2, n.id))
        for better in good:
            for other in good:
                if other.id == better.id or h.is_ancestor(other, better) \
                        or h.is_ancestor(better, other):
                    continue
                common = h.common_ancestor(better, other)
                changes = {k: h.value(other.id, k) for k in h.keys
                           if not same_value(h.value(common, k), h.value(other.id, k))
                           and same_value(h.value(common, k), h.value(better.id, k))}
                if h.taken(better.id, changes):
                    continue
                keys = ", ".join(changes)
                return Plan(
                    10, Strategy.RECOMBINE, better.id,
                    f"Nodes {better.id} + {other.id} (recombine)",
                    f"Nodes {better.id} and {other.id} are both good and in different branches: "
                    f"give the better one the {keys} the other's branch changed.",
                    f"Node {other.id}'s {keys} add to node {better.id}'s gains: the child beats "
                    "both.", changes)
        return None

    # row 11
    def exploit(self) -> Plan:
        h = self.history
        candidates = h.candidates()
        for rank, parent in enumerate(candidates):
            rule = (f"Node {parent.id} (highest score)" if rank == 0 else
                    f"Node {parent.id} (next by score: node {candidates[0].id} has no new step)")
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
                               "Every one-key step from every candidate is taken: re-test the "
                               "best one with another seed.")

    def _exploit_at(self, parent: NodeSummary, rule: str, lead: str) -> Plan | None:
        """One step at `parent`: the key that last helped, the way it helped, else any key."""
        helping = self._helping_key(parent)
        if helping is not None:
            key, direction, helper = helping
            step = self._one_step(parent.id, [key], [direction])
            if step is not None:
                way = "up" if direction > 0 else "down"
                return self._key_plan(
                    11, Strategy.EXPLOIT, parent.id, rule,
                    f"{lead}: step {key} {way} again, the way it helped at node {helper.id}.",
                    step)
        step = self._one_step(parent.id, self._shuffled(self.history.keys))
        if step is None:
            return None
        return self._key_plan(11, Strategy.EXPLOIT, parent.id, rule,
                              f"{lead} and no key has helped along this lineage yet: step a "
                              "random key.", step)

    def _helping_key(self, parent: NodeSummary) -> tuple[str, int, NodeSummary] | None:
        """The key whose change last helped along `parent`'s lineage, and which way."""
        h = self.history
        for node in h.lineage(parent.id):
            key = h.single_key(node)
            if key is None or key not in h.space or not h.is_success(node):
                continue
            direction = direction_of(h.space[key], h.value(node.parent_id, key),
                                     h.value(node.id, key))
            if direction:
                return key, direction, node
        return None


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
    return _is_number(slope) and math.isfinite(slope) and abs(slope - 1) > SLOPE_BIAS_BAND


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

    effects: dict[tuple[str, int, bool], list[int]] = {}
    worked: list[tuple[float, NodeSummary]] = []
    for node in nodes:
        key = history.single_key(node)
        parent = history.parent(node)
        if parent is None or parent.status != "done" or node.status != "done":
            continue
        delta = node.r2 - parent.r2
        worked.append((delta, node))
        if key is None or key not in history.space or abs(delta) <= LEVEL_R2_BAND:
            continue
        direction = direction_of(history.space[key], history.value(parent.id, key),
                                 history.value(node.id, key))
        if direction:
            effects.setdefault((key, direction, delta > 0), []).append(node.id)
    principles = []
    for (key, direction, helped), ids in sorted(effects.items()):
        if len(ids) >= 2:
            way = "Raising" if direction > 0 else "Lowering"
            verb = "helped" if helped else "hurt"
            principles.append(f"- {way} {key} {verb} in block {block} "
                              f"(nodes {', '.join(map(str, ids))})")
    memory.add_unique("established principles", principles)
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
