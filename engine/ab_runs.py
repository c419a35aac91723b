"""Running the A/B test of a code node (`proctor ab RUN NODE --seeds K`).

Both arms train under the node's config through the same sandboxed steps as any node, on an
executor slot (the CLI's own, or the slot of the node's iteration with `ab_seeds`): arm A
with the parent's code, arm B with the node's, each with `training.seed` = 1..K (the split
stays the run's). Every arm's outcome is journaled as it ends, so a test killed midway goes
on from there; the comparison (`engine.ab`) is journaled with the node. The run's noise
floor is measured once, from the first test's A arm (repeated runs of one config), and kept.
`proctor ab` holds the run's lock: no engine may drive the run meanwhile."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.ab import Comparison, compare, noise_floor
from engine.config import ExperimentConfig
from engine.evaluation import EvaluationPlan
from engine.executors import Executor, LocalExecutor, NodeJob
from engine.journal import Journal, RunEvent
from engine.paths import RunPaths
from engine.proposals import SEED_KEY, set_dotted
from engine.records import nodes_from_journal
from engine.runner import RunStatus, make_runner
from engine.runs import EngineError, package_of, reopen_run
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
    """Test node `node_id`'s code against its parent's over `seeds` paired seeds, here, in
    one local slot of its own (`sandbox/ab/`)."""
    opened = reopen_run(run_dir)
    try:
        paths = RunPaths(opened.run_dir)
        lineage = Lineage(opened.repo, opened.settings.name, opened.run_dir)
        code = CodeStore(opened.run_dir, package_of(opened.config),
                         opened.config.exploration.editable_files, lineage)
        tree = Tree.from_nodes(nodes_from_journal(opened.journal),
                               block_size=opened.config.exploration.block_size)
        test = ABTest(opened.journal, opened.config, tree, code, node_id, seeds, say)
        plan = EvaluationPlan.of(opened.config.exploration, opened.project_root)
        executor = LocalExecutor(1, plan, paths.sandbox / "ab",
                                 lambda: make_runner(opened.settings.runner))
        try:
            return await test.run(executor, 1)
        finally:
            await executor.aclose()
    finally:
        opened.journal.close()


class ABTest:
    """One A/B test of a code node, on any executor slot (the CLI's own, or a run's)."""

    def __init__(self, journal: Journal, config: ExperimentConfig, tree: Tree, code: CodeStore,
                 node_id: int, seeds: int, say: Callable[[str], None] = lambda text: None):
        self.journal, self.config, self.tree, self.code = journal, config, tree, code
        self.seeds, self.say = seeds, say
        self.paths = RunPaths(code.run_dir)
        self.node = self._testable(node_id)
        base = code.lineage.base
        self.commits = {"parent": tree.commit_of(self.node.parent_id, base),
                        "node": tree.commit_of(self.node.id, base)}

    def _testable(self, node_id: int) -> Node:
        if node_id not in self.tree:
            raise EngineError(f"the run has no finished node {node_id}")
        node = self.tree.get(node_id)
        if not node.code_changed or node.parent_id is None:
            raise EngineError(f"node {node_id} changed no code against a parent: an A/B test "
                              "compares a code change with its parent's code")
        if not node.finished or not self.tree.get(node.parent_id).finished:
            raise EngineError(f"node {node_id} or its parent did not finish: nothing to test")
        try:
            self.config.value_at(SEED_KEY)
        except KeyError:
            raise EngineError(f"the config has no {SEED_KEY} to vary between seeds") from None
        return node

    async def run(self, executor: Executor, slot: int) -> Comparison:
        """Every arm not journaled yet, then the comparison (journaled with the node)."""
        done = {(arm.seed, arm.arm): arm for arm in self._journaled()}
        for seed in range(1, self.seeds + 1):
            for arm in ARMS:
                if (seed, arm) not in done:
                    done[seed, arm] = await self._run_arm(executor, slot, seed, arm)
        return self._compare(done)

    def _journaled(self) -> list[ArmRun]:
        return [arm for arm in (ArmRun.from_dict(e.payload)
                                for e in self.journal.run_events(RunEvent.AB_RUN))
                if arm.node == self.node.id]

    async def _run_arm(self, executor: Executor, slot: int, seed: int, arm: str) -> ArmRun:
        exploration = self.config.exploration
        config = set_dotted(self.node.config, SEED_KEY, seed) | {
            "exploration": exploration.model_dump(mode="json")}
        folder = self.paths.node_dir(self.node.id) / "ab"
        folder.mkdir(parents=True, exist_ok=True)
        commit = self.commits[arm]
        self.say(f"node {self.node.id}: seed {seed}, {arm}'s code ...")
        job = NodeJob(self.node.id, seed, lambda target: self.code.materialise(commit, target),
                      yaml.safe_dump(config, sort_keys=False), exploration.seed,
                      folder / f"seed-{seed}-{arm}.log")
        result = await executor.run(slot, job)
        if result.status is RunStatus.STOPPED:
            raise ABStopped(f"the A/B test of node {self.node.id} was stopped")
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


class ABStopped(Exception):
    """The run stopped while one of the test's arms trained (it goes on at the resume)."""
