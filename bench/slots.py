"""Iterations per hour with 1 and 2 slots, local and on Dask, side by side.

Runs the same exploration (the offline agent, `approval: auto`, the tiny embedded experiment
with longer training) four times in fresh projects: local with 1 and 2 slots, and on a Dask
LocalCluster (`scheduler: local`, one worker process per slot) with 1 and 2 slots. Each
run's dataset is simulated before the clock starts, so the figures are the loop's: agent,
review, runs and records. Prints wall time, iterations per hour and the ratios.

usage: python bench/slots.py [--iterations 8] [--steps 300] [--no-dask]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.agents import make_agent  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.journal import Journal  # noqa: E402
from engine.loop import Engine  # noqa: E402
from engine.runs import RunSettings  # noqa: E402


def make_project(root: Path, slots: int, executor: str, iterations: int, steps: int) -> Path:
    for folder in ("models", "instructions"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    config["training"]["steps"] = steps
    config["exploration"].update(agent="heuristic", approval="auto", iterations=iterations,
                                 parallel=slots, runner="zygote")
    if executor == "dask":
        config["exploration"]["executor"] = {
            "kind": "dask", "dask": {"scheduler": "local", "scratch": str(root / "scratch")}}
    (root / "configs").mkdir()
    path = root / "configs" / "bench.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def one_exploration(config_path: Path, root: Path, iterations: int) -> float:
    """Seconds from the engine's start to its end; the dataset is built once beforehand."""
    config = load_config(config_path)
    settings = RunSettings(name="bench", config_path=str(config_path), iterations=iterations,
                           approval="auto", agent="heuristic", runner="zygote", watch_edits=False)
    engine = Engine.create(root, config, settings, make_agent("heuristic", config))
    started = time.perf_counter()
    try:
        finished = await engine.run()
    finally:
        engine.close()
    elapsed = time.perf_counter() - started
    with Journal.open_for_client(engine.run_dir) as journal:
        done = len(journal.completed_iterations())
    if done != iterations:
        raise SystemExit(f"{config_path}: {done} of {iterations} iterations ({finished.reason})")
    return elapsed


def warm_cache(config_path: Path, root: Path) -> None:
    """Simulate the dataset once into the project's cache and the Dask workers' shared one."""
    split = root / "warm-split"
    for cache in (root / "log" / "cache", root / "scratch" / "data-cache"):
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "models.harness", "prepare", "--config",
                   str(config_path), "--data-cache", str(cache), "--split", str(split)]
        # the harness reports on fd 3, which proctor's runner gives it; here nobody listens
        subprocess.run(["bash", "-c", '"$@" 3>/dev/null', "prepare", *command], cwd=root,
                       check=True, stdout=subprocess.DEVNULL)
        shutil.rmtree(split, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args()
    executors = ["local"]
    if not args.no_dask and importlib.util.find_spec("distributed") is not None:
        executors.append("dask")
    rows: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="proctor-bench-slots-") as folder:
        root = Path(folder)  # one unmeasured exploration: the first pays for cold caches
        config_path = make_project(root, 1, "local", 2, args.steps)
        warm_cache(config_path, root)
        asyncio.run(one_exploration(config_path, root, 2))
    for executor in executors:
        for slots in (1, 2):
            with tempfile.TemporaryDirectory(prefix="proctor-bench-slots-") as folder:
                root = Path(folder)
                config_path = make_project(root, slots, executor, args.iterations, args.steps)
                warm_cache(config_path, root)
                seconds = asyncio.run(one_exploration(config_path, root, args.iterations))
                rows[executor, slots] = seconds
                print(f"  {executor:5} {slots} slot(s): {args.iterations} iterations in "
                      f"{seconds:6.1f} s", flush=True)
    baseline = rows["local", 1]
    print(f"\n{args.iterations} iterations of the tiny experiment ({args.steps} training "
          "steps), offline agent:")
    print(f"{'executor':8} {'slots':>5} {'wall s':>8} {'iter/h':>8} {'vs 1 slot':>10} "
          f"{'vs local 1':>10}")
    for (executor, slots), seconds in rows.items():
        per_hour = args.iterations * 3600 / seconds
        same_one = rows[executor, 1]
        print(f"{executor:8} {slots:>5} {seconds:>8.1f} {per_hour:>8.0f} "
              f"{same_one / seconds:>9.2f}x {baseline / seconds:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
