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
    """One run of a harness module (`python -m <harness> --config C --results R [extra]`) with
    cwd = `workspace`, which holds that node's `models/` package.

    `env` adds variables to the allow-listed environment (e.g. CUDA_VISIBLE_DEVICES); names
    that look like credentials are refused whatever the caller says."""

    workspace: Path
    config_path: Path
    results_path: Path
    log_path: Path
    harness: str = "models.harness"
    extra_args: tuple[str, ...] = ()
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    env: Mapping[str, str] = field(default_factory=dict)

    def harness_argv(self) -> list[str]:
        """The harness's arguments (absolute paths: the child runs in the workspace)."""
        return [
            "--config",
            str(Path(self.config_path).absolute()),
            "--results",
            str(Path(self.results_path).absolute()),
            *self.extra_args,
        ]


class RunStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    CRASHED = "crashed"
    TIMEOUT = "timeout"
    OOM = "oom"
    DIVERGED = "diverged"
    RESOURCE_LIMIT = "resource_limit"
    STOPPED = "stopped"


@dataclass(frozen=True)
class RunResult:
    """What one run came to. Metrics come only from the harness's results file."""

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
