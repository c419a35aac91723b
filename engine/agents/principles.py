"""Established principles of memory.md, only from consistent evidence.

An observation is one finished child that changed one search-space key (and no code) from a
finished parent by more than the noise. A principle ("raising K helps") needs three or more
observations favouring it and none favouring the other way; the lines it writes name their
evidence, and a line it wrote earlier is withdrawn, with the counter-evidence named, once the
evidence contradicts it. Lines written by a human or by Claude are never rewritten: they are
prose, and prose is not parsed here. Only node ids and R² deltas reach these lines, never log
text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from engine.agents.base import NodeSummary
from engine.agents.search_model import direction_of, dotted_value, is_number
from engine.config import ParamRange

MINIMUM_AGREEING = 3  # "three or more agreeing observations, none against"
EVIDENCE_SHOWN = 6  # nodes named on one line before "and N more"
R2_KEY = "final_r2"

_WAY = {1: "Raising", -1: "Lowering"}
_DONE_WAY = {1: "raised", -1: "lowered"}
# A line this module writes (see `Principle.line`).
_OWN_LINE = re.compile(
    r"^- (?P<way>Raising|Lowering) (?P<key>\S+) helps "
    r"\(\d+ agreeing, none against: nodes? [^()]*\)$")
# A line the offline agent wrote before this module, from as few as two observations in one
# block ("- Raising K helped in block 2 (nodes 3, 4)"): held to the same rule as this
# module's own lines, so a weak or contradicted one is withdrawn.
_LEGACY_LINE = re.compile(
    r"^- (?P<way>Raising|Lowering) (?P<key>\S+) (?P<outcome>helped|hurt) in block \d+ "
    r"\(nodes? [\d, ]+\)$")


@dataclass(frozen=True)
class Observation:
    """One child that changed one search-space key of its parent, beyond the noise."""

    node_id: int
    parent_id: int
    key: str
    direction: int  # +1 the value went up, -1 down
    delta_r2: float  # the child's R² minus its parent's

    @property
    def favours(self) -> int:
        """The way of the key this observation supports: +1 raising, -1 lowering ("raising
        helped" and "lowering hurt" both favour raising)."""
        return self.direction * (1 if self.delta_r2 > 0 else -1)

    def evidence(self, favoured: int) -> str:
        """`9 +0.020`, or `9 lowered -0.020` when the change went against `favoured`'s way."""
        way = "" if self.direction == favoured else f"{_DONE_WAY[self.direction]} "
        return f"{self.node_id} {way}{self.delta_r2:+.3f}"


class Contradiction(NamedTuple):
    """A principle the evidence contradicts: (key, favoured) and the observations against it."""

    key: str
    favoured: int
    against: tuple[Observation, ...]


@dataclass(frozen=True)
class Principle:
    """Raising (favoured +1) or lowering (-1) `key` helps, with the observations that say so."""

    key: str
    favoured: int
    supporting: tuple[Observation, ...]

    def line(self) -> str:
        """`- Raising K helps (3 agreeing, none against: nodes 2 +0.316, 5 +0.012, 9 +0.020)`."""
        return (f"- {_WAY[self.favoured]} {self.key} helps ({len(self.supporting)} agreeing, "
                f"none against: {_evidence_list(self.supporting, self.favoured)})")


def observations(nodes: Sequence[NodeSummary], space: Mapping[str, ParamRange],
                 noise: float) -> list[Observation]:
    """Every done node with a done parent that changed exactly one search-space key and no
    code, by more than `noise` in R², in node id order."""
    by_id = {node.id: node for node in nodes}
    found = []
    for node in sorted(nodes, key=lambda n: n.id):
        parent = by_id.get(node.parent_id) if node.parent_id is not None else None
        if parent is None or node.code_changed or len(node.config_changes) != 1:
            continue
        key = next(iter(node.config_changes))
        spec = space.get(key)
        r2, parent_r2 = _finished_r2(node), _finished_r2(parent)
        if spec is None or r2 is None or parent_r2 is None or abs(r2 - parent_r2) <= noise:
            continue
        new = _value(node.config, key, node.config_changes[key])
        direction = direction_of(spec, _value(parent.config, key), new)
        if direction:
            found.append(Observation(node.id, parent.id, key, direction, r2 - parent_r2))
    return found


def principles(found: Sequence[Observation], minimum: int = MINIMUM_AGREEING,
               ) -> tuple[list[Principle], list[Contradiction]]:
    """The principles `found` supports (>= `minimum` observations favouring one way of a key,
    none the other way), sorted by key, and the contradictions: for each key with
    observations both ways, each way with the observations against it."""
    by_way: dict[tuple[str, int], list[Observation]] = {}
    for observation in sorted(found, key=lambda o: o.node_id):
        by_way.setdefault((observation.key, observation.favours), []).append(observation)
    held, contradicted = [], []
    for (key, favoured), supporting in sorted(by_way.items()):
        against = by_way.get((key, -favoured), [])
        if against:
            contradicted.append(Contradiction(key, favoured, tuple(against)))
        elif len(supporting) >= minimum:
            held.append(Principle(key, favoured, tuple(supporting)))
    return held, contradicted


def revise(existing: Sequence[str], found: Sequence[Principle],
           contradicted: Sequence[Contradiction | tuple[str, int, tuple[Observation, ...]]],
           ) -> tuple[list[str], list[str]]:
    """The Established principles section's new lines and the withdrawal notes.

    Lines this module wrote (and the offline agent's older `helped in block N` lines) give
    way to `found`, one line per principle with its current evidence; one whose principle no
    longer holds is dropped with a `- Withdrawn: ...` note naming the counter-evidence. Every
    other line is kept as written, first, in its order; the principles follow, by key.
    `found` and `contradicted` should come from the whole tree's observations: a principle
    missing from them reads as no longer held."""
    current = {(p.key, p.favoured): p for p in found}
    against = {(c[0], c[1]): tuple(c[2]) for c in contradicted}
    for principle in found:  # a principle's evidence is against the opposite way
        against.setdefault((principle.key, -principle.favoured), principle.supporting)
    kept: list[str] = []
    notes: list[str] = []
    withdrawn: set[tuple[str, int]] = set()
    for line in existing:
        claim = own_claim(line)
        if claim is None:
            kept.append(line)
        elif claim not in current and claim not in withdrawn:
            withdrawn.add(claim)
            notes.append(_withdrawal(*claim, against.get(claim, ())))
    lines = [p.line() for p in sorted(found, key=lambda p: (p.key, p.favoured))]
    return kept + lines, notes


def own_claim(line: str) -> tuple[str, int] | None:
    """(key, favoured) of a line this module (or the offline agent before it) wrote; None
    for any other line."""
    text = line.rstrip()
    if match := _OWN_LINE.match(text):
        return match["key"], _way(match["way"])
    if match := _LEGACY_LINE.match(text):
        return match["key"], _way(match["way"]) * (1 if match["outcome"] == "helped" else -1)
    return None


# -- helpers -------------------------------------------------------------------------------


def _finished_r2(node: NodeSummary) -> float | None:
    """The R² of a done node; None for any other status or a missing R² (which
    `NodeSummary.r2` reads as 0.0, and that would be false evidence)."""
    value = node.metrics.get(R2_KEY)
    if node.status != "done" or not is_number(value) or not math.isfinite(value):
        return None
    return float(value)


def _value(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """The value at `dotted` in nested sections (or a flat dotted key); `default` if absent."""
    if dotted in config:
        return config[dotted]
    try:
        return dotted_value(config, dotted)
    except KeyError:
        return default


def _way(word: str) -> int:
    return 1 if word == "Raising" else -1


def _evidence_list(found: Iterable[Observation], favoured: int) -> str:
    """`nodes 2 +0.316, 5 lowered -0.012`, the first `EVIDENCE_SHOWN` then `and N more`."""
    found = list(found)
    shown = ", ".join(o.evidence(favoured) for o in found[:EVIDENCE_SHOWN])
    more = f" and {len(found) - EVIDENCE_SHOWN} more" if len(found) > EVIDENCE_SHOWN else ""
    return f"node{'s' if len(found) > 1 else ''} {shown}{more}"


def _withdrawal(key: str, favoured: int, against: Sequence[Observation]) -> str:
    """`- Withdrawn: raising K helps (node 14 -0.081 against)`."""
    why = (f"{_evidence_list(against, favoured)} against" if against
           else "too few agreeing observations")
    return f"- Withdrawn: {_WAY[favoured].lower()} {key} helps ({why})"
