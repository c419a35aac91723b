"""Where a run's slots execute their nodes: `local` (this machine) or `dask` (a cluster).

    executor = make_executor(config, project_root, sandbox_root, make_runner)

`engine.executors.dask_cluster` (the Dask executor) is imported only when a config asks for
it: Dask is an optional extra (`pip install 'proctor[dask]'`)."""

from __future__ import annotations

import importlib.util
import re
import socket
from collections.abc import Callable
from pathlib import Path

from engine.config import ExperimentConfig
from engine.evaluation import EvaluationPlan
from engine.executors.base import (
    Executor,
    ExecutorError,
    NodeJob,
    PlacedCallback,
    Placement,
    Populate,
)
from engine.executors.local import LocalExecutor, visible_gpus
from engine.runner import Runner

__all__ = [
    "Executor",
    "ExecutorError",
    "LocalExecutor",
    "NodeJob",
    "PlacedCallback",
    "Placement",
    "Populate",
    "check_executor",
    "make_executor",
]

DASK_EXTRA = "pip install 'proctor[dask]'"
_REACH_TIMEOUT_S = 5.0


def check_executor(config: ExperimentConfig) -> None:
    """ExecutorError (one line) when the config's executor cannot be had on this machine;
    checked before a run is created, so a run folder is never left behind for it."""
    settings = config.exploration.executor
    if settings.kind == "local":
        check_devices(settings.devices, visible_gpus())
        return
    missing = [name for name in ("dask", "distributed")
               if importlib.util.find_spec(name) is None]
    if settings.dask.cluster is not None and importlib.util.find_spec("dask_jobqueue") is None:
        missing.append("dask_jobqueue")
    if missing:
        raise ExecutorError(f"executor: dask needs {', '.join(missing)}, which this Python "
                            f"lacks: {DASK_EXTRA}")
    if settings.dask.scheduler not in (None, "local"):
        check_reachable(settings.dask.scheduler)


def make_executor(config: ExperimentConfig, project_root: Path, sandbox_root: Path,
                  make_runner: Callable[[], Runner], runner_mode: str = "zygote") -> Executor:
    """The executor `exploration.executor` names, with `exploration.parallel` slots; local
    slots get their runners from `make_runner`, Dask workers make `runner_mode` ones.
    ExecutorError (one line) when it cannot be had, e.g. Dask is not installed."""
    exploration = config.exploration
    plan = EvaluationPlan.of(exploration, project_root)
    settings = exploration.executor
    if settings.kind == "local":
        return LocalExecutor(exploration.parallel, plan, sandbox_root, make_runner,
                             devices=settings.devices)
    check_executor(config)
    try:
        from engine.executors.dask_cluster import DaskExecutor
    except ImportError as exc:
        raise ExecutorError(f"executor: dask needs Dask ({exc.name or exc}): {DASK_EXTRA}") \
            from None
    return DaskExecutor(exploration.parallel, plan, settings.dask, runner=runner_mode)


def check_devices(devices: list[str], gpus: list[str]) -> None:
    """Every `cuda:N` a slot is pinned to is a GPU this machine shows."""
    for device in devices:
        kind, _, number = device.partition(":")
        if kind == "cuda" and (not gpus or (number or "0") not in gpus):
            shown = f"GPUs {', '.join(gpus)}" if gpus else "no GPU"
            raise ExecutorError(f"executor.devices names {device}, but this machine shows "
                                f"{shown} (CUDA_VISIBLE_DEVICES and the NVIDIA driver)")


def check_reachable(address: str) -> None:
    """A scheduler address that is not one, or where nothing listens, is said at once (Dask
    itself would wait out its whole connect timeout)."""
    match = re.fullmatch(r"(?:(tcp|tls)://)?\[?([\w.:-]+?)\]?:(\d{1,5})", address.strip())
    if match is None:
        raise ExecutorError(f"dask.scheduler {address!r} is not a scheduler address "
                            "(tcp://host:port, tls://host:port or local)")
    host, port = match.group(2), int(match.group(3))
    try:
        with socket.create_connection((host, port), timeout=_REACH_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ExecutorError(f"cannot reach the Dask scheduler {address}: "
                            f"{exc.strerror or exc}") from None
