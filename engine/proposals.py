"""Checking a proposal and preparing it for review; nothing is written here.

`ProposalChecker.prepare` validates the parent, every config change against the search
space and every edit against the whitelist, and builds the node the proposal would add with
its diffs; `review_of` turns that into the journaled `Review` a human decides on."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import ExperimentConfig
from engine.edits import EditError, apply_edits, unified_diff, validate_files
from engine.human import HumanChange
from engine.proposal import Proposal
from engine.review import Review, diff_counts, proposal_id
from engine.tree import Node, NodeStatus, Tree, block_of

# Keys an agent may set outside the search space (the protocol's Step 5.1 exceptions).
REGIME_KEYS = {"dataset.field", "dataset.n_frames"}
SEED_KEY = "training.seed"
APPROVAL_POLICIES = ("auto", "code", "all")


class ProposalRejected(ValueError):
    """A proposal the engine refuses before anything is applied."""

    def __init__(self, message: str, *, policy_violation: bool = False):
        super().__init__(message)
        self.policy_violation = policy_violation


def set_dotted(config: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with `dotted` set to `value`."""
    updated = copy.deepcopy(config)
    node = updated
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return updated


def config_changes(
    before: dict[str, Any], after: dict[str, Any], prefix: str = ""
) -> dict[str, tuple[Any, Any]]:
    """Every leaf that differs, as dotted key -> (old, new)."""
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(before) | set(after)):
        dotted = f"{prefix}{key}"
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes.update(config_changes(old, new, dotted + "."))
        elif old != new:
            changes[dotted] = (old, new)
    return changes


def describe_changes(changes: dict[str, tuple[Any, Any]], separator: str = "\n") -> str:
    """`key: old -> new` per change."""
    return separator.join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())


def needs_review(policy: str, proposal: Proposal, human: HumanChange | None) -> bool:
    """Whether a proposal waits for a human under an approval policy (a human's own change
    never does)."""
    if human is not None:
        return False
    return policy == "all" or (policy == "code" and proposal.changes_code)


@dataclass(frozen=True)
class Prepared:
    """A checked proposal: the node it adds, the editable files after it, its diffs."""

    node: Node
    files: dict[str, str]
    diff: str
    config_diff: str


class ProposalChecker:
    """Checks proposals against the run's config, its tree and the code at each node."""

    def __init__(self, config: ExperimentConfig, tree: Tree,
                 files_at: Callable[[int | None], dict[str, str]]):
        self.config = config
        self.exploration = config.exploration
        self.tree = tree
        self.files_at = files_at

    def parent_config(self, node: Node) -> dict[str, Any]:
        return self.config_at(node.parent_id)

    def config_at(self, node_id: int | None) -> dict[str, Any]:
        if node_id is None:
            return self.config.experiment_sections()
        return self.tree.get(node_id).config

    def prepare(self, iteration: int, proposal: Proposal, human: HumanChange | None = None,
                edited: dict[str, str] | None = None) -> Prepared:
        """Validate a proposal and build its node. `edited`: the human's version of the
        editable files, which replaces the proposal's edits."""
        parent_id = proposal.parent_id
        if parent_id is not None:
            if parent_id not in self.tree:
                raise ProposalRejected(f"parent {parent_id} is not a node of the tree")
            parent = self.tree.get(parent_id)
            if parent.status in (NodeStatus.FAILED, NodeStatus.PENDING, NodeStatus.RUNNING):
                raise ProposalRejected(f"parent {parent_id} is {parent.status}: pick a finished "
                                       "node from the score table")
            if parent_id in self.tree.withheld:
                raise ProposalRejected(f"parent {parent_id} is a code change whose gain an A/B "
                                       "test has not confirmed: pick a node from the score "
                                       "table")
        parent_config = self.config_at(parent_id)
        if human is not None and human.config is not None:
            config = human.config
        else:
            config = parent_config
            for key, value in proposal.config_changes.items():
                self.check_change(key, value)
                config = set_dotted(config, key, value)
        before = self.files_at(parent_id)
        whitelist = self.exploration.editable_files
        try:
            if edited is not None:
                changed = validate_files(edited, before, whitelist)
            elif human is not None:
                changed = validate_files(human.files, before, whitelist)
            else:
                changed = apply_edits(before, proposal.edits, whitelist)
        except EditError as exc:
            raise ProposalRejected(str(exc), policy_violation=exc.policy_violation) from None
        files = {**before, **changed}
        changes = config_changes(parent_config, config)
        mutation = proposal.mutation or describe_changes(changes, "; ") or "none"
        node = Node(
            id=iteration, parent_id=parent_id, config=config, code_changed=files != before,
            status=NodeStatus.PENDING, author="agent" if human is None else "human",
            strategy=str(proposal.strategy), mutation=mutation,
            block=block_of(iteration, self.exploration.block_size),
        )
        return Prepared(node, files, unified_diff(before, files), describe_changes(changes))

    def check_change(self, key: str, value: Any) -> None:
        space = self.exploration.search_space
        if key in REGIME_KEYS or key == SEED_KEY:
            try:
                self.config.value_at(key)
            except KeyError:
                raise ProposalRejected(f"'{key}' is not a key of this experiment") from None
            return
        if key not in space:
            allowed = ", ".join(sorted(space)) or "none"
            raise ProposalRejected(f"'{key}' is not in the search space (allowed: {allowed})")
        spec = space[key]
        if spec.choices is not None:
            if value not in spec.choices:
                raise ProposalRejected(f"{key}={value!r} is not one of {spec.choices}")
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProposalRejected(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value) or not spec.low <= value <= spec.high:
            raise ProposalRejected(f"{key}={value!r} is outside [{spec.low}, {spec.high}]")
        if spec.integer and int(value) != value:
            raise ProposalRejected(f"{key} must be an integer, got {value!r}")


def review_of(iteration: int, attempt: int, proposal: Proposal, human: HumanChange | None,
              prepared: Prepared | None, *, awaiting: bool = False,
              refused: ProposalRejected | Exception | None = None) -> Review:
    """The journaled review of one attempt: its id, diffs, and awaiting or refused."""
    content = {"proposal": proposal.model_dump(mode="json"),
               "human": human.to_dict() if human is not None else None}
    diff = prepared.diff if prepared is not None else ""
    added, removed = diff_counts(diff)
    files = sorted({edit.file for edit in proposal.edits} | set(human.files if human else ()))
    texts = {path: prepared.files[path] for path in files
             if prepared is not None and path in prepared.files}
    mutation = prepared.node.mutation if prepared is not None else (proposal.mutation or "")
    return Review(
        proposal_id=proposal_id(iteration, attempt, content), iteration=iteration,
        attempt=attempt, mutation=mutation, diff=diff,
        config_diff=prepared.config_diff if prepared is not None else "",
        files=tuple(files), texts=texts, added=added, removed=removed, awaiting=awaiting,
        refused=str(refused) if refused is not None else None,
        policy_violation=bool(getattr(refused, "policy_violation", False)),
        by_human=human is not None, parent_id=proposal.parent_id)
