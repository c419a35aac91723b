"""Per-run overhead of the runner's two modes, measured side by side in one process.

Each run executes a tiny harness (tests/runner_scripts/bench: a handful of torch steps) that
reports its own work time; overhead = the wall time of `runner.run(...)` as the engine sees
it, minus that work time. Runs alternate between the modes so both see the same machine.
The zygote's one-off start (importing torch) is reported separately.

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
from engine.runner import RunRequest, RunStatus, make_runner  # noqa: E402

SCRIPTS = ROOT / "tests" / "runner_scripts"
TARGET_RATIO = 1 / 20
TARGET_ZYGOTE_MS = 150.0


def _workspace(scratch: Path, steps: int) -> Path:
    workspace = scratch / "workspace"
    shutil.copytree(SCRIPTS / "bench", workspace)
    shutil.copy(SCRIPTS / "fakekit.py", workspace / "models" / "fakekit.py")
    (workspace / "case.json").write_text(json.dumps({"steps": steps}))
    return workspace


async def _one(runner, request: RunRequest) -> tuple[float, float]:
    """(overhead seconds, wall seconds) of one run."""
    started = time.perf_counter()
    result = await runner.run(request)
    wall = time.perf_counter() - started
    if result.status is not RunStatus.OK:
        raise SystemExit(f"{runner.mode} run failed: {result.error}\n{result.traceback_tail}")
    return wall - result.metrics["work_s"], wall


async def main(runs: int, steps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="proctor-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        workspace = _workspace(scratch, steps)
        request = RunRequest(
            workspace=workspace,
            config_path=workspace / "case.json",
            results_path=scratch / "out" / "results.json",
            log_path=scratch / "out" / "train.log",
            timeouts=Timeouts(wall_s=120, no_output_s=120),
            limits=Limits(memory_mb=None),
        )
        runners = {mode: make_runner(mode) for mode in ("subprocess", "zygote")}
        try:
            started = time.perf_counter()
            await _one(runners["zygote"], request)  # starts the zygote: paid once per runner
            first_zygote_run = time.perf_counter() - started
            await _one(runners["subprocess"], request)  # warm the page cache for both
            overheads: dict[str, list[float]] = {mode: [] for mode in runners}
            walls: dict[str, list[float]] = {mode: [] for mode in runners}
            for _ in range(runs):
                for mode, runner in runners.items():
                    overhead, wall = await _one(runner, request)
                    overheads[mode].append(overhead)
                    walls[mode].append(wall)
        finally:
            for runner in runners.values():
                await runner.aclose()

    medians = {mode: statistics.median(values) * 1000 for mode, values in overheads.items()}
    ratio = medians["zygote"] / medians["subprocess"]
    print(f"runs per mode: {runs}; harness: {steps} torch steps")
    for mode, values in overheads.items():
        low, high = min(values) * 1000, max(values) * 1000
        print(
            f"  {mode:<10} median overhead {medians[mode]:8.1f} ms  (min {low:.1f}, max "
            f"{high:.1f});  median whole run {statistics.median(walls[mode]) * 1000:8.1f} ms"
        )
    print(f"  zygote first run (starts it, imports torch): {first_zygote_run * 1000:.0f} ms")
    print(f"  ratio zygote/subprocess: {ratio:.3f} (target <= {TARGET_RATIO:.3f})")
    verdict = ratio <= TARGET_RATIO and medians["zygote"] <= TARGET_ZYGOTE_MS
    print(f"  target met: {'yes' if verdict else 'no'} (zygote <= {TARGET_ZYGOTE_MS:.0f} ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.steps))
