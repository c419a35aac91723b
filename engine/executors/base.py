"""Executors: where the k slots of a run execute their nodes.

The engine hands an executor one `NodeJob` per node with the slot it runs in; the executor
runs the node's prepare -> train -> predict -> score steps (`engine.evaluation`) wherever it
runs them and returns the combined `RunResult`. While a run goes it reports where it is
(`Placement`, whose `record` the engine journals, so a resumed engine can `reclaim` a run a
killed engine left behind) and streams the training log's lines back.

    executor = make_executor(exploration, project_root, run_dir)
    await executor.start()               # connect to a cluster; ExecutorError if it cannot
    result = await executor.run(slot, job, on_output=..., on_placed=...)
    await executor.stop(slot)            # from another task: the run ends STOPPED
    await executor.reclaim(record)       # a run of a killed engine: killed or cancelled
    await executor.aclose()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.runner import OutputCallback, RunResult

Populate = Callable[[Path], None]  # writes the node's experiment package into a folder


class ExecutorError(RuntimeError):
    """The executor cannot run anything (no Dask installed, scheduler unreachable, ...): one
    line for the person who configured it."""


@dataclass(frozen=True)
class NodeJob:
    """One node's run: its code (`populate`), its config snapshot, the seed its split is
    made with and the node's training log on this machine."""

    iteration: int
    attempt: int
    populate: Populate
    config_text: str
    seed: int
    log_path: Path


@dataclass(frozen=True)
class Placement:
    """Where a slot's run executes now. `where` is for people ("local slot 2 on cuda:1",
    "dask worker tcp://10.1.2.3:40211"); `record` is JSON for the journal: what `reclaim`
    needs to find the run again after the engine died (a local step's process identity, or
    a Dask scheduler and task key)."""

    slot: int
    where: str
    record: dict[str, Any] = field(default_factory=dict)
    pid: int = 0  # the local step's leader, 0 for a remote run


PlacedCallback = Callable[[Placement], None]


class Executor(ABC):
    """Runs nodes in `slots` slots at once; one run per slot at a time."""

    kind: str

    def __init__(self, slots: int):
        self.slots = slots

    async def start(self) -> None:  # noqa: B027 - a local executor has nothing to start
        """Get ready to run (connect to or start a cluster); ExecutorError when it cannot."""

    @abstractmethod
    async def run(self, slot: int, job: NodeJob, *, on_output: OutputCallback | None = None,
                  on_placed: PlacedCallback | None = None) -> RunResult:
        """Run one node in `slot` (1-based) and return its combined result."""

    @abstractmethod
    async def stop(self, slot: int) -> None:
        """Stop the run in `slot`, if any, and wait until it ended (its result is STOPPED)."""

    @abstractmethod
    async def reclaim(self, record: dict[str, Any]) -> str | None:
        """End a run a killed engine left going (`Placement.record`); a line saying what was
        done, None when there was nothing left to end."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop every run and release what the executor holds (zygotes, the cluster)."""

    def describe(self, slot: int) -> str:
        """Where `slot` runs, before any run placed it (for the app and `status`)."""
        return f"slot {slot}"
