"""Running the A/B test of a code node (`proctor ab RUN NODE --seeds K`).

Both arms train under the node's config through the same sandboxed steps as any node: arm A
with the parent's code, arm B with the node's, each with `training.seed` = 1..K (the split
stays the run's). Every arm's outcome is journaled as it ends, so a test killed midway goes
on from there; the comparison (`engine.ab`) is journaled with the node. The run's noise
floor is measured once, from the first test's A arm (repeated runs of one config), and kept.
The test holds the run's lock: no engine may drive the run meanwhile."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.ab import Comparison, compare, noise_floor
from engine.evaluation import EvaluationPlan, evaluate
from engine.journal import RunEvent
from engine.paths import RunPaths
from engine.proposals import SEED_KEY, set_dotted
from engine.records import nodes_from_journal
from engine.runner import RunStatus, make_runner
from engine.runs import EngineError, OpenedRun, package_of, reopen_run
from engine.state import RunState
from engine.tree import Node, Tree
from engine.vcs import Lineage
from engine.workspace import CodeStore

ARMS = ("parent", "node")  # A: the parent's code, B: the node's; both under the node's config


@dataclass(frozen=True)
class ArmRun:
    """One arm of one seed, as journaled when it ended."""

    node: int
    seed: int
    arm: str
    status: str
    r2: float | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArmRun:
        return cls(int(data["node"]), int(data["seed"]), str(data["arm"]), str(data["status"]),
                   data.get("r2"))


def ab_results(journal: Any) -> dict[int, Comparison]:
    """Every A/B result the run's journal holds, by node (the latest test of each)."""
    results = {}
    for event in journal.run_events(RunEvent.AB_RESULT):
        payload = dict(event.payload)
        node = int(payload.pop("node"))
        results[node] = Comparison.from_dict(payload)
    return results


async def run_ab(run_dir: Path, node_id: int, seeds: int,
                 say: Callable[[str], None] = lambda text: None) -> Comparison:
    """Test node `node_id`'s code against its parent's over `seeds` paired seeds."""
    opened = reopen_run(run_dir)
    try:
        return await _ABTest(opened, node_id, seeds, say).run()
    finally:
        opened.journal.close()


class _ABTest:
    def __init__(self, opened: OpenedRun, node_id: int, seeds: int,
                 say: Callable[[str], None]):
        self.opened, self.seeds, self.say = opened, seeds, say
        self.journal = opened.journal
        self.paths = RunPaths(opened.run_dir)
        nodes = nodes_from_journal(self.journal)
        self.tree = Tree.from_nodes(nodes, block_size=opened.config.exploration.block_size)
        self.node = self._testable(node_id)
        lineage = Lineage(opened.repo, opened.settings.name, opened.run_dir)
        self.code = CodeStore(opened.run_dir, package_of(opened.config),
                              opened.config.exploration.editable_files, lineage)
        self.commits = {"parent": self.tree.commit_of(self.node.parent_id, lineage.base),
                        "node": self.tree.commit_of(self.node.id, lineage.base)}

    def _testable(self, node_id: int) -> Node:
        if node_id not in self.tree:
            raise EngineError(f"run {self.opened.settings.name} has no finished node {node_id}")
        node = self.tree.get(node_id)
        if not node.code_changed or node.parent_id is None:
            raise EngineError(f"node {node_id} changed no code against a parent: an A/B test "
                              "compares a code change with its parent's code")
        if not node.finished or not self.tree.get(node.parent_id).finished:
            raise EngineError(f"node {node_id} or its parent did not finish: nothing to test")
        try:
            self.opened.config.value_at(SEED_KEY)
        except KeyError:
            raise EngineError(f"the config has no {SEED_KEY} to vary between seeds") from None
        return node

    async def run(self) -> Comparison:
        done = {(arm.seed, arm.arm): arm for arm in self._journaled()}
        exploration = self.opened.config.exploration
        plan = EvaluationPlan.of(exploration, self.opened.project_root)
        runner = make_runner(self.opened.settings.runner)
        try:
            for seed in range(1, self.seeds + 1):
                for arm in ARMS:
                    if (seed, arm) not in done:
                        done[seed, arm] = await self._run_arm(runner, plan, seed, arm)
        finally:
            await runner.aclose()
        return self._compare(done)

    def _journaled(self) -> list[ArmRun]:
        return [arm for arm in (ArmRun.from_dict(e.payload)
                                for e in self.journal.run_events(RunEvent.AB_RUN))
                if arm.node == self.node.id]

    async def _run_arm(self, runner: Any, plan: EvaluationPlan, seed: int, arm: str) -> ArmRun:
        config = set_dotted(self.node.config, SEED_KEY, seed) | {
            "exploration": self.opened.config.exploration.model_dump(mode="json")}
        folder = self.paths.node_dir(self.node.id) / "ab"
        folder.mkdir(parents=True, exist_ok=True)
        commit = self.commits[arm]
        self.say(f"node {self.node.id}: seed {seed}, {arm}'s code ...")
        result = await evaluate(runner, plan, self.paths.sandbox / "ab",
                                lambda target: self.code.materialise(commit, target),
                                yaml.safe_dump(config, sort_keys=False),
                                folder / f"seed-{seed}-{arm}.log",
                                seed=self.opened.config.exploration.seed)
        r2 = result.metrics.get("final_r2") if result.status is RunStatus.OK else None
        record = ArmRun(self.node.id, seed, arm, result.status.value, r2)
        self.journal.append_run_event(RunEvent.AB_RUN, record.__dict__)
        self.say(f"node {self.node.id}: seed {seed}, {arm}'s code: "
                 + (f"R2 {r2:.4f}" if r2 is not None else f"{result.status.value}: "
                    f"{result.error}"))
        return record

    def _compare(self, done: dict[tuple[int, str], ArmRun]) -> Comparison:
        pairs = [(seed, done[seed, "parent"].r2, done[seed, "node"].r2)
                 for seed in range(1, self.seeds + 1)
                 if done[seed, "parent"].r2 is not None and done[seed, "node"].r2 is not None]
        if len(pairs) < 2:
            raise EngineError(f"node {self.node.id}: only {len(pairs)} seed(s) ran cleanly in "
                              "both arms; an A/B test needs two (see nodes/*/ab/*.log)")
        seeds, parent, node = (tuple(column) for column in zip(*pairs, strict=True))
        state = RunState(self.journal)
        noise = state.noise_floor
        if noise is None:  # measured once per run: the A arm is one config run over seeds
            noise = state.noise_floor = noise_floor(parent)
        comparison = compare(seeds, parent, node, noise)
        self.journal.append_run_event(RunEvent.AB_RESULT,
                                      {"node": self.node.id, **comparison.to_dict()})
        return comparison
