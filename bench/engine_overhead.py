"""The engine's own cost per iteration (journal, logs, tree scoring, workspace), with the
agent and the training taken out: an instant scripted agent and an instant runner.

Runs one exploration of 1,000 iterations on the fake test experiment and prints the median
cost per iteration around 10, 100 and 1,000 nodes, side by side, with ratios to the first.
Block ends start the tree picture's drawer, a child process (one at a time, the others are
skipped): it competes for the CPU but never for the engine's event loop; the count of
pictures drawn is printed too.

usage: python bench/engine_overhead.py [--nodes 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from scripted_agent import ScriptedAgent  # noqa: E402

from engine import events as ev  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.loop import Engine  # noqa: E402
from engine.runner import RunResult, RunStatus  # noqa: E402
from engine.runs import RunSettings  # noqa: E402

TARGET_MS = 20.0
BLOCK_SIZE = 12


class ConfigOnlyAgent(ScriptedAgent):
    """Every proposal after the baseline is a learning-rate change (the common case)."""

    async def propose(self, context):
        if context.iteration % 2 == 1 and context.candidates:
            context = replace(context, iteration=context.iteration + 1)
        return await super().propose(context)


class InstantRunner:
    """Answers at once with the metrics a real harness would write."""

    async def run(self, request, on_output=None, on_started=None) -> RunResult:
        if on_output:
            on_output(["step 1/1 loss 1.0e-3"])
        return RunResult(RunStatus.OK, 0, None,
                         {"final_r2": 0.8, "slope": 1.0, "final_mse": 0.01,
                          "training_time_s": 0.01}, {}, None, "", 0.0, None, False)

    async def stop_current(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def measure(root: Path, nodes: int, agent) -> tuple[dict[int, float], int]:
    config = load_config(root / "configs" / "fake.yaml")
    settings = RunSettings(name="bench", config_path="fake.yaml", iterations=nodes,
                           approval="auto", agent="scripted", runner="subprocess")
    starts: dict[int, float] = {}

    def publish(event: ev.Event) -> None:
        if isinstance(event, ev.IterationStarted):
            starts[event.iteration] = time.perf_counter()
        elif isinstance(event, ev.RunFinished):
            starts[nodes + 1] = time.perf_counter()

    engine = Engine.create(root, config, settings, agent, publish, InstantRunner())
    try:
        await engine.run()
    finally:
        engine.close()
    pictures = len(list(engine.paths.memory_snapshots_dir.glob("tree_block_*.png")))
    return {i: (starts[i + 1] - starts[i]) * 1000 for i in range(1, nodes + 1)}, pictures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    args = parser.parse_args()
    results, pictures = {}, {}
    for label, agent in (("config-only", ConfigOnlyAgent()), ("half code edits", ScriptedAgent())):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "project"
            shutil.copytree(REPO / "tests" / "fakeproject", root,
                            ignore=shutil.ignore_patterns("__pycache__", "log"))
            config = root / "configs" / "fake.yaml"
            config.write_text(config.read_text().replace("block_size: 4",
                                                         f"block_size: {BLOCK_SIZE}"))
            results[label], pictures[label] = asyncio.run(measure(root, args.nodes, agent))
    marks = [m for m in (10, 100, 1000) if m <= args.nodes]
    print(f"engine overhead per iteration, ms (agent and training excluded; "
          f"target <= {TARGET_MS:g} ms at 1,000 nodes)")
    print(f"{'nodes':>6} " + " ".join(f"{label + ' median':>24} {'p90':>7}" for label in results)
          + f" {'code/config':>12}")
    for mark in marks:
        cells, medians = [], []
        for per_iteration in results.values():
            window = [per_iteration[i] for i in range(max(1, mark - 9), mark + 1)]
            median = statistics.median(window)
            p90 = sorted(window)[int(0.9 * (len(window) - 1))]
            medians.append(median)
            cells.append(f"{median:>24.2f} {p90:>7.2f}")
        print(f"{mark:>6} " + " ".join(cells) + f" {medians[1] / medians[0]:>11.2f}x")
    print(f"tree pictures drawn (of {args.nodes // BLOCK_SIZE} block ends): "
          + ", ".join(f"{label} {count}" for label, count in pictures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
