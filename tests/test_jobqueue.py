"""Batch-queue clusters (engine/executors/jobqueue.py): the job scripts rendered for Slurm,
LSF and PBS from a config, and a run through a stand-in Slurm whose `sbatch` starts the job
on this machine (no queue here)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest
from test_dask_executor import FAKE_KEY, node_job, plan

from engine.config import DaskSettings, ExperimentConfig, JobQueueCluster
from engine.executors import ExecutorError
from engine.executors.dask_cluster import DaskExecutor
from engine.executors.jobqueue import render_job_script, walltime_for
from engine.runner import RunStatus

LAB = {"queue": "gpu", "account": "lab42", "cores": 8, "memory": "32GB", "gpus": 2,
       "walltime": "1-02:30:00", "job_extra_directives": ["--exclusive"],
       "job_script_prologue": ["module load cuda/12", "source ~/venv/bin/activate"],
       "python": "/opt/lab/bin/python", "interface": "ib0",
       "local_directory": "/scratch/$USER"}


def config(system: str, **keys: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"exploration": {"executor": {
        "kind": "dask", "dask": {"cluster": {"system": system, **keys}}}}})


def directives(script: str, prefix: str) -> list[str]:
    return [line.removeprefix(prefix + " ") for line in script.splitlines()
            if line.startswith(prefix)]


def worker_command(script: str) -> str:
    [line] = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    return line


def test_a_slurm_job_asks_for_the_configs_queue_cores_memory_gpus_and_time():
    script = render_job_script(config("slurm", **LAB))
    assert directives(script, "#SBATCH") == [
        "-J proctor-worker", "-p gpu", "-A lab42", "-n 1", "--cpus-per-task=8", "--mem=30G",
        "-t 1-02:30:00", "--gres=gpu:2", "--exclusive"]
    lines = script.splitlines()
    assert lines.index("module load cuda/12") < lines.index(worker_command(script))
    assert "source ~/venv/bin/activate" in lines
    command = worker_command(script)
    assert command.startswith("/opt/lab/bin/python -m distributed.cli.dask_worker ")
    for part in ("--nthreads 1", "--nanny", "--interface ib0",
                 "--local-directory /scratch/$USER"):
        assert part in command  # one node at a time per job, on all of its cores


def test_an_lsf_job_says_the_same_in_bsub_terms(tmp_path, monkeypatch):
    (tmp_path / "lsf.conf").write_text("LSF_UNIT_FOR_LIMITS=MB\n")
    monkeypatch.setenv("LSF_ENVDIR", str(tmp_path))  # as on an LSF host: -M in its units
    script = render_job_script(config("lsf", **LAB))
    assert directives(script, "#BSUB") == [
        "-J proctor-worker", "-q gpu", '-P "lab42"', "-n 8", '-R "span[hosts=1]"',
        "-M 32000", "-W 26:30", '-gpu "num=2"', "--exclusive"]
    assert "module load cuda/12" in script.splitlines()


def test_a_pbs_job_puts_cores_memory_and_gpus_in_its_select():
    script = render_job_script(config("pbs", **LAB))
    assert directives(script, "#PBS") == [
        "-N proctor-worker", "-q gpu", "-A lab42", "-l select=1:ncpus=8:mem=30GB:ngpus=2",
        "-l walltime=26:30:00", "--exclusive"]


def test_a_cpu_job_asks_for_no_gpu():
    for system, marker in (("slurm", "gres"), ("lsf", "-gpu"), ("pbs", "ngpus")):
        script = render_job_script(JobQueueCluster(system=system))
        assert marker not in script
    assert "#SBATCH -t 04:00:00" in render_job_script(JobQueueCluster(system="slurm"))


@pytest.mark.parametrize(("given", "slurm", "lsf"), [
    ("90", "01:30:00", "1:30"), ("30:15", "00:30:15", "0:31"), ("04:00:00", "04:00:00", "4:00"),
    ("2-00:00:00", "2-00:00:00", "48:00"), ("1-6", "1-06:00:00", "30:00")])
def test_a_walltime_is_read_as_slurm_reads_it_and_written_in_each_systems_form(
        given, slurm, lsf):
    assert walltime_for("slurm", given) == slurm
    assert walltime_for("lsf", given) == lsf


def test_a_config_without_a_cluster_has_no_job_script():
    with pytest.raises(ExecutorError, match="no executor.dask.cluster"):
        render_job_script(ExperimentConfig())


# ---- a stand-in Slurm: sbatch starts the job script here, scancel ends it -------------------

SBATCH = f"""#!{sys.executable}
import os, shutil, subprocess, sys
from pathlib import Path
queue = Path(__file__).parent / "queue"
queue.mkdir(exist_ok=True)
script = queue / f"job-{{os.getpid()}}.sh"
shutil.copy(sys.argv[-1], script)
environment = "\\n".join(f"{{k}}={{v}}" for k, v in os.environ.items())
(queue / f"env-{{os.getpid()}}").write_text(environment)
with open(queue / f"job-{{os.getpid()}}.log", "wb") as log:
    job = subprocess.Popen(["bash", str(script)], stdin=subprocess.DEVNULL, stdout=log,
                           stderr=log, start_new_session=True)
(queue / f"pgid-{{job.pid}}").write_text("")
print(f"Submitted batch job {{job.pid}}")
"""
SCANCEL = f"""#!{sys.executable}
import os, signal, sys
from pathlib import Path
os.killpg(int(sys.argv[1]), signal.SIGTERM)
(Path(__file__).parent / "queue" / f"cancelled-{{sys.argv[1]}}").write_text("")
"""


@pytest.fixture
def slurm(tmp_path, monkeypatch) -> Path:
    """`sbatch` and `scancel` on PATH, and the fake API key in the environment; the folder
    where submitted jobs leave their scripts, environments and logs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", SBATCH), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
    yield bin_dir / "queue"
    for leftover in (bin_dir / "queue").glob("pgid-*"):  # a test that failed midway
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(leftover.name.removeprefix("pgid-")), signal.SIGKILL)


async def test_a_run_goes_to_a_slurm_job_submitted_without_the_key(slurm, tmp_path):
    settings = DaskSettings(cluster=JobQueueCluster(system="slurm", cores=1, memory="2GB",
                                                    adaptive_maximum=1))
    executor = DaskExecutor(1, plan(tmp_path), settings, preload=("yaml",))
    await executor.start()
    try:
        assert FAKE_KEY not in render_job_script(settings.cluster, executor.address)
        result = await executor.run(1, node_job(tmp_path, "queued", value=0.25))
    finally:
        await executor.aclose()
    assert result.status is RunStatus.OK and result.metrics["final_r2"] == 0.25, result.error
    [environment] = slurm.glob("env-*")
    assert "ANTHROPIC_API_KEY" not in environment.read_text()
    assert FAKE_KEY not in environment.read_text()
    [script] = slurm.glob("job-*.sh")
    assert "#SBATCH --cpus-per-task=1" in script.read_text()
    [pgid] = slurm.glob("pgid-*")
    assert (slurm / pgid.name.replace("pgid", "cancelled")).exists()  # closing ends the job


async def test_a_job_script_that_would_carry_the_key_is_never_submitted(slurm, tmp_path):
    cluster = JobQueueCluster(system="slurm", adaptive_minimum=1,
                              job_script_prologue=[f"export TOKEN={FAKE_KEY}"])
    executor = DaskExecutor(1, plan(tmp_path), DaskSettings(cluster=cluster))
    with pytest.raises(ExecutorError) as caught:
        await executor.start()
    assert str(caught.value) == (
        "the Slurm job script would hold the value of ANTHROPIC_API_KEY (job_script_prologue "
        "or job_extra_directives): refusing to submit it")
    assert not slurm.exists()


async def test_without_sbatch_a_slurm_cluster_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    executor = DaskExecutor(1, plan(tmp_path), DaskSettings(
        cluster=JobQueueCluster(system="slurm")))
    with pytest.raises(ExecutorError) as caught:
        await executor.start()
    assert str(caught.value) == ("cluster system slurm submits jobs with sbatch, which is not "
                                 "on PATH here: run proctor on a Slurm submit host")


async def test_a_queue_that_refuses_the_jobs_ends_the_run_with_its_answer(slurm, tmp_path):
    (slurm.parent / "sbatch").write_text(
        f"#!{sys.executable}\nimport sys\n"
        "print('sbatch: error: Invalid account or account/partition combination specified',"
        " file=sys.stderr)\nsys.exit(1)\n")
    settings = DaskSettings(cluster=JobQueueCluster(system="slurm", account="nobody"))
    executor = DaskExecutor(1, plan(tmp_path), settings)
    await executor.start()
    try:
        result = await asyncio.wait_for(executor.run(1, node_job(tmp_path, "refused")), 60)
    finally:
        await executor.aclose()
    assert result.status is RunStatus.LOST
    assert result.error == ("the slurm cluster cannot start a Dask worker: sbatch: error: "
                            "Invalid account or account/partition combination specified")
