"""The runner: executes a harness module for one node in an isolated fresh process.

runner = make_runner("zygote")          # or "subprocess", the reference
result = await runner.run(RunRequest(...), on_output=..., on_started=journal.record)
await runner.aclose()

kill_orphan(identity)                   # after a supervisor crash, from the journal
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from engine.runner.containment import ContainmentChoice
from engine.runner.isolation import ProcessIdentity, kill_orphan
from engine.runner.runner import OutputCallback, Runner, StartedCallback
from engine.runner.subprocess_mode import SubprocessRunner
from engine.runner.types import RunRequest, RunResult, RunStatus
from engine.runner.zygote import DEFAULT_PRELOAD, ZygoteRunner

__all__ = [
    "ContainmentChoice",
    "OutputCallback",
    "ProcessIdentity",
    "RunRequest",
    "RunResult",
    "RunStatus",
    "Runner",
    "StartedCallback",
    "SubprocessRunner",
    "ZygoteRunner",
    "kill_orphan",
    "make_runner",
]


def make_runner(
    mode: Literal["zygote", "subprocess"] = "zygote",
    *,
    preload: Sequence[str] = DEFAULT_PRELOAD,
    containment: ContainmentChoice = "auto",
) -> Runner:
    """A runner for `exploration.runner`. `preload`: what the zygote imports up front;
    `containment`: how a run's processes are tracked ("auto": a cgroup where possible)."""
    if mode == "zygote":
        return ZygoteRunner(preload=preload, containment=containment)
    if mode == "subprocess":
        return SubprocessRunner(containment=containment)
    raise ValueError(f"unknown runner mode {mode!r} (expected 'zygote' or 'subprocess')")
