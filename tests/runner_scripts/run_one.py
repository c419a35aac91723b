"""Runs one RunRequest (given as JSON) with a fresh runner of MODE, as whoever runs this
script, and prints the result as one JSON line. tests/test_sandbox.py runs it as an
unprivileged user.

    python run_one.py MODE REQUEST_JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from engine.runner import RunRequest, make_runner


async def main(mode: str, fields: dict) -> None:
    for name in ("workspace", "log_path"):
        fields[name] = Path(fields[name])
    for name in ("argv", "read_only", "read_write", "hide"):
        fields[name] = tuple(fields.get(name, ()))
    runner = make_runner(mode)
    try:
        result = await runner.run(RunRequest(**fields))
    finally:
        await runner.aclose()
    print(json.dumps(result.to_dict()), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
