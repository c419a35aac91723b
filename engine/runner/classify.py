"""From how a run ended (exit status, why we interrupted it, what a trusted run sent on its
results channel, its log tail) to a RunStatus and one clear error line. Metrics come only from
the results channel, which an untrusted run never holds: its status is its exit code's."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engine.runner.isolation import SETUP_FAILED_EXIT, SETUP_FAILED_PREFIX, ExitInfo
from engine.runner.types import RunRequest, RunStatus

RESULTS_MAX_BYTES = 4 * 2**20
_OOM_MARKS = (
    "MemoryError",
    "Cannot allocate memory",
    "can't allocate memory",
    "std::bad_alloc",
    "out of memory",
)
_FILE_SIZE_MARKS = ("File too large", "[Errno 27]")
_TRACEBACK_STARTS = ("Traceback (most recent call last)", "Fatal Python error")


class Interruption(StrEnum):
    """Why the supervisor ended a run itself."""

    STOPPED = "stopped"
    WALL_TIMEOUT = "wall_timeout"
    NO_OUTPUT_TIMEOUT = "no_output_timeout"
    PROCESS_LIMIT = "process_limit"


@dataclass(frozen=True)
class HarnessResults:
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def parse_results(data: bytes, overflowed: bool) -> tuple[HarnessResults | None, list[str]]:
    """What a trusted harness sent on its results channel, validated; None (with a reason)
    when nothing, too much or something invalid came."""
    if overflowed:
        return None, [f"the results channel carried more than {RESULTS_MAX_BYTES} bytes; ignored"]
    if not data:
        return None, []
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"the results channel carried invalid JSON: {exc}"]
    if not isinstance(parsed, dict) or parsed.get("status") not in ("ok", "diverged", "failed"):
        return None, ["the results channel carried no valid status"]
    return _validated(parsed)


def _validated(data: dict[str, Any]) -> tuple[HarnessResults, list[str]]:
    warnings = []
    metrics: dict[str, float] = {}
    raw_metrics = data.get("metrics") or {}
    if isinstance(raw_metrics, dict):
        for name, value in raw_metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[str(name)] = float(value)
            else:
                warnings.append(f"metric {name!r} is not a number; ignored")
    hyperparameters = data.get("hyperparameters")
    error = data.get("error")
    return (
        HarnessResults(
            status=data["status"],
            metrics=metrics,
            hyperparameters=hyperparameters if isinstance(hyperparameters, dict) else {},
            error=str(error) if error else None,
        ),
        warnings,
    )


def traceback_tail(lines: Sequence[str], limit: int = 40) -> str:
    """The last `limit` lines of the output from its last traceback (or faulthandler dump) on;
    the last `limit` lines when there is none."""
    start = 0
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith(_TRACEBACK_STARTS):
            start = index
            break
    return "\n".join(lines[start:][-limit:])


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


@dataclass(frozen=True)
class Verdict:
    status: RunStatus
    error: str | None
    exit_code: int | None
    signal: int | None


def classify(
    request: RunRequest,
    ended: ExitInfo,
    interruption: Interruption | None,
    results: HarnessResults | None,
    tail: str,
    process_limit_hit: bool,
) -> Verdict:
    """The status of a finished run (see the module docstring)."""
    exit_code = signal_number = None
    if ended.wait_status is not None:
        if os.WIFSIGNALED(ended.wait_status):
            signal_number = os.WTERMSIG(ended.wait_status)
        elif os.WIFEXITED(ended.wait_status):
            exit_code = os.WEXITSTATUS(ended.wait_status)

    def verdict(status: RunStatus, error: str | None) -> Verdict:
        return Verdict(status, error, exit_code, signal_number)

    timeouts, limits = request.timeouts, request.limits
    if interruption is Interruption.STOPPED:
        return verdict(RunStatus.STOPPED, "stopped on request")
    if interruption is Interruption.WALL_TIMEOUT:
        return verdict(
            RunStatus.TIMEOUT, f"wall-clock timeout: still running after {timeouts.wall_s:g} s"
        )
    if interruption is Interruption.NO_OUTPUT_TIMEOUT:
        return verdict(
            RunStatus.TIMEOUT, f"no-output timeout: silent for {timeouts.no_output_s:g} s"
        )
    if interruption is Interruption.PROCESS_LIMIT:
        return verdict(RunStatus.RESOURCE_LIMIT, f"process limit ({limits.processes}) exceeded")
    if ended.lost is not None:
        return verdict(RunStatus.CRASHED, ended.lost)

    last = _last_line(tail)
    looks_oom = any(mark in tail for mark in _OOM_MARKS)
    memory = f"memory limit ({limits.memory_mb} MB)" if limits.memory_mb else "memory"
    if signal_number is not None:
        name = signal.Signals(signal_number).name
        if signal_number == signal.SIGXFSZ:
            return verdict(
                RunStatus.RESOURCE_LIMIT, f"file-size limit ({limits.file_size_mb} MB) exceeded"
            )
        if looks_oom:
            return verdict(RunStatus.OOM, f"{memory} exhausted: {last}")
        if signal_number == signal.SIGKILL:
            return verdict(
                RunStatus.OOM,
                "killed by SIGKILL from outside the run (most likely the kernel's "
                "out-of-memory killer)",
            )
        return verdict(RunStatus.CRASHED, f"killed by signal {name}")

    if (results is not None and results.status == "diverged") or exit_code == 3:
        return verdict(RunStatus.DIVERGED, (results and results.error) or "training diverged")
    if exit_code == 0 and (not request.trusted or (results is not None and results.status == "ok")):
        return verdict(RunStatus.OK, None)
    if process_limit_hit:
        return verdict(RunStatus.RESOURCE_LIMIT, f"process limit ({limits.processes}) exceeded")
    if exit_code == SETUP_FAILED_EXIT and SETUP_FAILED_PREFIX in tail:
        setup_line = next(line for line in tail.splitlines() if SETUP_FAILED_PREFIX in line)
        return verdict(RunStatus.FAILED, setup_line.strip())
    if looks_oom:
        return verdict(RunStatus.OOM, f"{memory} exhausted: {last}")
    if any(mark in tail for mark in _FILE_SIZE_MARKS):
        return verdict(
            RunStatus.RESOURCE_LIMIT, f"file-size limit ({limits.file_size_mb} MB) exceeded: {last}"
        )
    detail = (results and results.error) or last
    if exit_code == 0:
        return verdict(
            RunStatus.FAILED, "the harness exited 0 without a valid result on its results channel"
        )
    if exit_code == 2:
        return verdict(RunStatus.FAILED, f"the harness refused its config (exit 2): {detail}")
    return verdict(RunStatus.FAILED, f"exit code {exit_code}" + (f": {detail}" if detail else ""))
