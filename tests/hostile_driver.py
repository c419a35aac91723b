"""Runs one node's four steps on a project as the engine does (`engine.evaluation.evaluate`),
once for each plan given, and prints each result as a JSON line. tests/test_hostile.py runs it
as root and as an unprivileged user.

    python hostile_driver.py PROJECT MODE PLAN_JSON [PLAN_JSON ...]

Each PLAN_JSON becomes the project's `models/hostile.json` for that evaluation."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

from engine.evaluation import EvaluationPlan, evaluate
from engine.runner import make_runner

CONFIG = Path("configs/tiny.yaml")


async def main(project: Path, mode: str, plans: list[str]) -> None:
    runner = make_runner(mode)
    key_file = project / "home" / "anthropic.key"
    plan = EvaluationPlan(harness="models.harness", data_cache=project / "log" / "cache" / "data",
                          hide=(key_file,))
    try:
        for number, text in enumerate(plans):
            def populate(folder: Path, text: str = text) -> None:
                shutil.copytree(project / "models", folder / "models",
                                ignore=shutil.ignore_patterns("__pycache__"))
                (folder / "models" / "hostile.json").write_text(text)

            result = await evaluate(runner, plan, project / "log" / "r1" / "sandbox", populate,
                                    (project / CONFIG).read_text(),
                                    project / "log" / "r1" / f"training-{number}.log")
            print(json.dumps(result.to_dict()), flush=True)
    finally:
        await runner.aclose()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]))
