"""The runner's values: what to run, and what came of it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from engine.config import Limits, Timeouts
from engine.runner.isolation import ProcessIdentity

__all__ = ["ProcessIdentity", "RunRequest", "RunResult", "RunStatus"]


@dataclass(frozen=True)
class RunRequest:
    """One sandboxed run of `python -m <harness> <argv...>` with cwd = `workspace`, which holds
    the node's `models/` package.

    The run sees the workspace (writable), `read_write` and `read_only` host paths at their own
    place, the system and the Python installation read-only, and nothing else; `hide` masks
    key files even inside an exposed path. Only a `trusted` run (no editable code in it) gets
    the results channel (fd 3); an untrusted run reports by exit code alone. `env` adds
    variables to the allow-listed environment (e.g. CUDA_VISIBLE_DEVICES); names that look
    like credentials are refused whatever the caller says."""

    workspace: Path  # cwd and sys.path[0] of the run; writable; holds the node's models/ package
    argv: tuple[str, ...]  # arguments after `python -m <harness>`
    log_path: Path
    harness: str = "models.harness"
    read_only: tuple[Path, ...] = ()  # extra host paths the run may read (same path inside)
    read_write: tuple[Path, ...] = ()  # extra host paths the run may write
    hide: tuple[Path, ...] = ()  # paths that must stay invisible even inside an exposed one
    trusted: bool = False  # True: no editable code runs in it (prepare/score steps)
    append_log: bool = False  # append to log_path (several steps share one training.log)
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    env: Mapping[str, str] = field(default_factory=dict)


class RunStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    CRASHED = "crashed"
    TIMEOUT = "timeout"
    OOM = "oom"
    DIVERGED = "diverged"
    RESOURCE_LIMIT = "resource_limit"
    STOPPED = "stopped"
    LOST = "lost"  # the machine running it went away (a Dask worker): not the code's fault


@dataclass(frozen=True)
class RunResult:
    """What one run came to. Metrics and hyperparameters come only from the results channel of
    a trusted run."""

    status: RunStatus
    exit_code: int | None
    signal: int | None
    metrics: dict[str, float]
    hyperparameters: dict[str, Any]
    error: str | None
    traceback_tail: str
    wall_s: float
    peak_rss_mb: float | None
    log_truncated: bool
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.OK

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for the journal); NaN metrics survive as floats."""
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        data["warnings"] = list(self.warnings)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        values = dict(data)
        values["status"] = RunStatus(values["status"])
        values["warnings"] = tuple(values.get("warnings", ()))
        return cls(**values)
