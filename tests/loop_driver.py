"""Runs the engine with the scripted agent in its own process (for crash/resume tests).

usage: python tests/loop_driver.py PROJECT_ROOT RUN_NAME ITERATIONS [resume | APPROVAL]
(APPROVAL: auto, the default, code or all)"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scripted_agent import ScriptedAgent  # noqa: E402

from engine.config import load_config  # noqa: E402
from engine.loop import Engine  # noqa: E402
from engine.runs import RunSettings  # noqa: E402


def main() -> int:
    root, name, iterations = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "auto"
    if mode == "resume":
        engine = Engine.reopen(root / "log" / name, lambda config, settings: ScriptedAgent())
    else:
        config_path = root / "configs" / "fake.yaml"
        config = load_config(config_path)
        settings = RunSettings(name=name, config_path=str(config_path), iterations=iterations,
                               approval=mode, agent="scripted", runner="subprocess")
        engine = Engine.create(root, config, settings, ScriptedAgent())
    try:
        asyncio.run(engine.run())
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
