"""Batch-queue clusters for the Dask executor: `executor.dask.cluster` (Slurm, LSF, PBS) as
dask-jobqueue builds them, each Dask worker one batch job that runs one node at a time.

    kwargs = cluster_kwargs(settings)        # what dask-jobqueue's cluster and job classes take
    print(render_job_script(config))         # each worker's job script (nothing is submitted)
    cluster = await start_cluster(settings)  # the cluster, adapting between min and max jobs

A job asks the queue for `cores` CPUs, `memory` and `gpus`, and its worker runs one thread
(one node at a time, training on all of the job's cores). Jobs are submitted from an
environment without any credential-like variable (sbatch and bsub export the submitting
environment by default), and a job script that would carry a secret's value is refused.
"""

from __future__ import annotations

import math
import shutil
import sys
from typing import Any

from engine.config import ExperimentConfig, JobQueueCluster
from engine.executors.base import ExecutorError
from engine.executors.dask_cluster import environment_without_secrets, secret_carried

SYSTEMS = {  # system: (dask-jobqueue cluster class, submit command, name for people)
    "slurm": ("SLURMCluster", "sbatch", "Slurm"),
    "lsf": ("LSFCluster", "bsub", "LSF"),
    "pbs": ("PBSCluster", "qsub", "PBS"),
}
JOB_NAME = "proctor-worker"
PLACEHOLDER_SCHEDULER = "tcp://<scheduler>:8786"  # in a script rendered without a cluster
TASK_DURATION = "1h"  # what adaptive scaling assumes of a run before it has timed one
DASHBOARD = ":0"  # a free port: several runs may share a login node


def walltime_seconds(text: str) -> int:
    """Seconds of a walltime in Slurm's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, clock = text.strip().rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days:
        hours, minutes, seconds = (parts + [0, 0])[:3]
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 3:
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)


def walltime_for(system: str, text: str) -> str:
    """The walltime as `system` writes it: Slurm [D-]HH:MM:SS, PBS HH:MM:SS, LSF H:MM
    (minutes rounded up)."""
    seconds = walltime_seconds(text)
    if system == "lsf":
        minutes = math.ceil(seconds / 60)
        return f"{minutes // 60}:{minutes % 60:02d}"
    days, hours = divmod(seconds // 3600, 24) if system == "slurm" else (0, seconds // 3600)
    clock = f"{hours:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{days}-{clock}" if days else clock


def cluster_kwargs(settings: JobQueueCluster) -> dict[str, Any]:
    """The keyword arguments of dask-jobqueue's cluster (and job) class for `settings`.

    dask-jobqueue's `cores` is the worker's threads, so it is 1 here (one node at a time);
    the CPUs the queue grants go in the system's own directive."""
    extra = list(settings.job_extra_directives)
    kwargs: dict[str, Any] = {
        "cores": 1,
        "processes": 1,
        "memory": settings.memory,
        "queue": settings.queue,
        "walltime": walltime_for(settings.system, settings.walltime),
        "job_script_prologue": list(settings.job_script_prologue),
        "python": settings.python or sys.executable,
        "interface": settings.interface,
        "local_directory": settings.local_directory,
        "job_name": JOB_NAME,
    }
    if settings.system == "slurm":
        kwargs.update(account=settings.account, job_cpu=settings.cores)
        if settings.gpus:
            extra.insert(0, f"--gres=gpu:{settings.gpus}")
    elif settings.system == "lsf":
        kwargs.update(project=settings.account, ncpus=settings.cores)
        if settings.gpus:
            extra.insert(0, f'-gpu "num={settings.gpus}"')
    else:
        from dask.utils import parse_bytes
        from dask_jobqueue.pbs import pbs_format_bytes_ceil

        memory = pbs_format_bytes_ceil(parse_bytes(settings.memory))
        spec = f"select=1:ncpus={settings.cores}:mem={memory}"
        kwargs.update(account=settings.account,
                      resource_spec=spec + (f":ngpus={settings.gpus}" if settings.gpus else ""))
    kwargs["job_extra_directives"] = extra
    return kwargs


def render_job_script(config: ExperimentConfig | JobQueueCluster,
                      scheduler: str = PLACEHOLDER_SCHEDULER) -> str:
    """The batch script each worker job of `config`'s cluster runs (for `proctor jobscript`);
    nothing is submitted, no queue is needed. ExecutorError when the config has no cluster
    or dask-jobqueue is missing."""
    settings = config if isinstance(config, JobQueueCluster) else \
        config.exploration.executor.dask.cluster
    if settings is None:
        raise ExecutorError("the config has no executor.dask.cluster to render a job script for")
    job_class = _classes(settings.system)[1]
    return job_class(scheduler, name=JOB_NAME, **cluster_kwargs(settings)).job_script()


async def start_cluster(settings: JobQueueCluster) -> Any:
    """The dask-jobqueue cluster of `settings`, started (its scheduler runs in this process)
    and adapting between `adaptive_minimum` and `adaptive_maximum` jobs. ExecutorError (one
    line) when it cannot be: dask-jobqueue or the submit command missing, a secret in the
    job script."""
    cluster_class, _ = _classes(settings.system, submit_failures=[])
    _, submit, name = SYSTEMS[settings.system]
    if shutil.which(submit, path=environment_without_secrets().get("PATH")) is None:
        raise ExecutorError(f"cluster system {settings.system} submits jobs with {submit}, which "
                            f"is not on PATH here: run proctor on a {name} submit host")
    carried = secret_carried(render_job_script(settings))
    if carried is not None:
        raise ExecutorError(f"the {name} job script would hold the value of {carried} "
                            "(job_script_prologue or job_extra_directives): refusing to submit it")
    import dask

    dask.config.set({"distributed.scheduler.default-task-durations.proctor": TASK_DURATION})
    cluster = await cluster_class(asynchronous=True, silence_logs=False,
                                  scheduler_options={"dashboard_address": DASHBOARD},
                                  **cluster_kwargs(settings))
    cluster.adapt(minimum_jobs=settings.adaptive_minimum, maximum_jobs=settings.adaptive_maximum)
    return cluster


def _classes(system: str, submit_failures: list[str] | None = None) -> tuple[type, type]:
    """dask-jobqueue's cluster and job classes for `system`, submitting without secrets. The
    cluster class's `submit_failures` holds why the last submission failed (one line), and is
    emptied by one that succeeds."""
    try:
        import dask_jobqueue
    except ImportError:
        raise ExecutorError("executor dask with a cluster needs dask-jobqueue: "
                            "pip install 'proctor[dask]'") from None
    cluster_class = getattr(dask_jobqueue, SYSTEMS[system][0])
    failures = [] if submit_failures is None else submit_failures
    job_class = _secret_free(cluster_class.job_cls, failures)
    return type(cluster_class.__name__, (cluster_class,),
                {"job_cls": job_class, "submit_failures": failures}), job_class


def _secret_free(job_class: type, failures: list[str]) -> type:
    """`job_class` whose submit and cancel commands run without credential-like variables,
    and whose failed submissions are noted in `failures`."""
    base_call, base_start = job_class._call, job_class.start

    async def _call(cmd: list[str], *, shell: bool = False, **kwargs: Any) -> str:
        kwargs.setdefault("env", environment_without_secrets())
        return await base_call(cmd, shell=shell, **kwargs)

    async def start(self: Any) -> None:
        try:
            await base_start(self)
        except Exception as exc:
            failures[:] = [_failure_line(exc)]
            raise
        failures.clear()

    return type(job_class.__name__, (job_class,), {"_call": staticmethod(_call),
                                                   "start": start})


def _failure_line(exc: Exception) -> str:
    """The telling line of a failed submission (dask-jobqueue quotes the command's output)."""
    lines = [line.strip() for line in str(exc).splitlines()
             if line.strip() and line.strip() not in ("stdout:", "stderr:")]
    return lines[-1] if lines else type(exc).__name__

