"""Where a run's slots execute their nodes: `local` (this machine) or `dask` (a cluster).

    executor = make_executor(config, project_root, sandbox_root, make_runner)

`engine.executors.dask_cluster` (the Dask executor) is imported only when a config asks for
it: Dask is an optional extra (`pip install 'proctor[dask]'`)."""

from __future__ import annotations

import importlib.util
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
from engine.executors.local import LocalExecutor
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


def check_executor(config: ExperimentConfig) -> None:
    """ExecutorError (one line) when the config's executor cannot be had on this machine;
    checked before a run is created, so a run folder is never left behind for it."""
    if config.exploration.executor.kind != "dask":
        return
    missing = [name for name in ("dask", "distributed")
               if importlib.util.find_spec(name) is None]
    if config.exploration.executor.dask.cluster is not None \
            and importlib.util.find_spec("dask_jobqueue") is None:
        missing.append("dask_jobqueue")
    if missing:
        raise ExecutorError(f"executor: dask needs {', '.join(missing)}, which this Python "
                            f"lacks: {DASK_EXTRA}")


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
