"""Per-run overhead of the runner's two modes, sandboxed and (for comparison) not, measured
side by side in one process.

Each run is an untrusted run (the train and predict steps are: uid 65534 when root, no
results channel) of a tiny harness (tests/runner_scripts/bench: a handful of torch steps)
that notes its own work time in its workspace; overhead = the wall time of `runner.run(...)`
as the engine sees it, minus that work time. Runs alternate between the runners so all see the
same machine. Each zygote's one-off start (importing torch) is reported separately.

    .venv/bin/python bench/runner_overhead.py [--runs 10] [--steps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import Limits, Timeouts  # noqa: E402
from engine.evaluation import EvaluationPlan, evaluate  # noqa: E402
from engine.runner import Runner, RunRequest, RunStatus, SubprocessRunner, ZygoteRunner  # noqa: E402
from engine.runner.sandbox import probe  # noqa: E402

SCRIPTS = ROOT / "tests" / "runner_scripts"
TARGET_RATIO = 1 / 10
TARGET_ZYGOTE_MS = 150.0
RUNNERS = {
    "zygote": lambda: ZygoteRunner(),
    "subprocess": lambda: SubprocessRunner(),
    "zygote, no sandbox": lambda: ZygoteRunner(sandbox=False),
    "subprocess, no sandbox": lambda: SubprocessRunner(sandbox=False),
}


def _request(scratch: Path, steps: int) -> RunRequest:
    """A request with its own workspace (a sandboxed run as root hands its workspace over to
    uid 65534, which an unsandboxed one without capabilities could not write then)."""
    workspace = Path(tempfile.mkdtemp(dir=scratch)) / "workspace"
    shutil.copytree(SCRIPTS / "bench", workspace)
    shutil.copy(SCRIPTS / "fakekit.py", workspace / "models" / "fakekit.py")
    (workspace / "case.json").write_text(json.dumps({"steps": steps}))
    return RunRequest(
        workspace=workspace,
        argv=("--config", str(workspace / "case.json")),
        log_path=workspace.parent / "train.log",
        timeouts=Timeouts(wall_s=120, no_output_s=120),
        limits=Limits(memory_mb=None),
    )


async def _one(name: str, runner: Runner, request: RunRequest) -> tuple[float, float]:
    """(overhead seconds, wall seconds) of one run."""
    (request.workspace / "work_s.txt").unlink(missing_ok=True)
    started = time.perf_counter()
    result = await runner.run(request)
    wall = time.perf_counter() - started
    if result.status is not RunStatus.OK:
        raise SystemExit(f"{name} run failed: {result.error}\n{result.traceback_tail}")
    work_s = float((request.workspace / "work_s.txt").read_text())
    return wall - work_s, wall


async def main(runs: int, steps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="proctor-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        runners = {name: factory() for name, factory in RUNNERS.items()}
        requests = {name: _request(scratch, steps) for name in runners}
        first_runs: dict[str, float] = {}
        try:
            for name, runner in runners.items():  # starts each zygote; warms the page cache
                started = time.perf_counter()
                await _one(name, runner, requests[name])
                first_runs[name] = time.perf_counter() - started
            overheads: dict[str, list[float]] = {name: [] for name in runners}
            walls: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(runs):
                for name, runner in runners.items():
                    overhead, wall = await _one(name, runner, requests[name])
                    overheads[name].append(overhead)
                    walls[name].append(wall)
        finally:
            for runner in runners.values():
                await runner.aclose()
    _report(runs, steps, overheads, walls, first_runs)


def _report(runs: int, steps: int, overheads: dict[str, list[float]],
            walls: dict[str, list[float]], first_runs: dict[str, float]) -> None:
    medians = {name: statistics.median(values) * 1000 for name, values in overheads.items()}
    missing = [layer.name for layer in probe() if not layer.active]
    print(f"runs per runner: {runs}; harness: {steps} torch steps; untrusted runs")
    print(f"sandbox layers missing here: {', '.join(missing) or 'none'}")
    for name, values in overheads.items():
        low, high = min(values) * 1000, max(values) * 1000
        print(
            f"  {name:<23} median overhead {medians[name]:8.1f} ms  (min {low:.1f}, max "
            f"{high:.1f});  median whole run {statistics.median(walls[name]) * 1000:8.1f} ms"
        )
    for name in ("zygote", "zygote, no sandbox"):
        print(f"  {name} first run (starts it, imports torch): {first_runs[name] * 1000:.0f} ms")
    ratio = medians["zygote"] / medians["subprocess"]
    sandbox_cost = {mode: medians[mode] - medians[f"{mode}, no sandbox"]
                    for mode in ("zygote", "subprocess")}
    print(f"  sandbox cost per run: zygote {sandbox_cost['zygote']:+.1f} ms, "
          f"subprocess {sandbox_cost['subprocess']:+.1f} ms")
    print(f"  ratio zygote/subprocess (sandboxed): {ratio:.3f} (target <= {TARGET_RATIO:.3f})")
    verdict = ratio <= TARGET_RATIO and medians["zygote"] <= TARGET_ZYGOTE_MS
    print(f"  target met: {'yes' if verdict else 'no'} (zygote <= {TARGET_ZYGOTE_MS:.0f} ms)")


async def _node(runner: Runner, area: Path, log: Path) -> float:
    """Wall seconds of one node's steps (train, predict and score once the split exists)."""
    plan = EvaluationPlan(harness="models.harness", data_cache=area.parent / "cache",
                          timeouts=Timeouts(wall_s=120, no_output_s=120),
                          limits=Limits(memory_mb=None))

    def populate(folder: Path) -> None:
        shutil.copytree(SCRIPTS / "bench_steps" / "models", folder / "models")

    started = time.perf_counter()
    result = await evaluate(runner, plan, area, populate, "{}\n", log)
    if result.status is not RunStatus.OK:
        raise SystemExit(f"a node failed: {result.error}\n{result.traceback_tail}")
    return time.perf_counter() - started


async def nodes(runs: int) -> None:
    """Whole nodes side by side: the overhead a node pays for its sandboxed steps."""
    with tempfile.TemporaryDirectory(prefix="proctor-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        scratch.chmod(0o755)  # the sandboxed steps (uid 65534 when root) reach their folders
        runners = {name: factory() for name, factory in RUNNERS.items()}
        first: dict[str, float] = {}
        walls: dict[str, list[float]] = {name: [] for name in runners}
        try:
            for name, runner in runners.items():  # the four steps, the zygote's start too
                first[name] = await _node(runner, scratch / name / "area", scratch / "log")
            for _ in range(runs):
                for name, runner in runners.items():
                    walls[name].append(await _node(runner, scratch / name / "area",
                                                   scratch / "log"))
        finally:
            for runner in runners.values():
                await runner.aclose()
    medians = {name: statistics.median(values) * 1000 for name, values in walls.items()}
    print(f"\none node (train, predict, score; the split prepared once), {runs} per runner:")
    for name in runners:
        print(f"  {name:<23} median {medians[name]:8.1f} ms  (min {min(walls[name]) * 1000:.1f},"
              f" max {max(walls[name]) * 1000:.1f}); first node with prepare "
              f"{first[name] * 1000:.0f} ms")
    ratio = medians["zygote"] / medians["subprocess"]
    print(f"  ratio zygote/subprocess (sandboxed): {ratio:.3f}; sandbox cost per node: zygote "
          f"{medians['zygote'] - medians['zygote, no sandbox']:+.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.steps))
    asyncio.run(nodes(args.runs))
