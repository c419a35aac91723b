"""Checks, on a machine with a GPU, that training inside the sandbox can use it: prints the
sandbox layers this machine has, then runs one node's four steps (prepare, train, predict,
score) on CUDA in both runner modes and prints what came of it.

    python bench/gpu_sandbox_check.py [--config tests/configs/tiny.yaml] [--device cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.config import Limits, Timeouts  # noqa: E402
from engine.evaluation import EvaluationPlan, evaluate  # noqa: E402
from engine.runner import make_runner  # noqa: E402
from engine.runner.sandbox import probe  # noqa: E402


async def check(mode: str, config: Path, device: str, scratch: Path) -> None:
    plan = EvaluationPlan(harness="models.harness", data_cache=scratch / "cache",
                          timeouts=Timeouts(wall_s=600, no_output_s=300),
                          limits=Limits(memory_mb=None), device=device)

    def populate(folder: Path) -> None:
        shutil.copytree(REPO / "models", folder / "models",
                        ignore=shutil.ignore_patterns("__pycache__"))

    runner = make_runner(mode)
    log = scratch / f"{mode}.log"
    try:
        started = time.perf_counter()
        result = await evaluate(runner, plan, scratch / f"area-{mode}", populate,
                                config.read_text(), log)
        wall = time.perf_counter() - started
    finally:
        await runner.aclose()
    text = log.read_text()
    on_device = next((line for line in text.splitlines() if "training on" in line), "?")
    print(f"{mode}: status {result.status.value} in {wall:.1f} s; {on_device.strip()}")
    print("  metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
    if result.error:
        print(f"  error: {result.error}\n{result.traceback_tail[-2000:]}")
    for warning in result.warnings:
        print(f"  warning: {warning}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "tests" / "configs" / "tiny.yaml")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="zygote,subprocess")
    args = parser.parse_args()
    for layer in probe():
        print(f"{'active ' if layer.active else 'MISSING'} {layer.name}: {layer.detail}")
    with tempfile.TemporaryDirectory(prefix="proctor-gpu-") as scratch:
        Path(scratch).chmod(0o755)
        for mode in args.modes.split(","):
            asyncio.run(check(mode, args.config, args.device, Path(scratch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
