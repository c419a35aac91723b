"""Slots on Dask through the whole loop: a 2-slot exploration of the tiny embedded experiment
on a LocalCluster of two worker processes, and kill -9 of an engine with two runs in flight
on an existing scheduler, then resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from git_project import make_git_project
from waiting import wait_for

pytest.importorskip("distributed")

from distributed import Client, LocalCluster  # noqa: E402

from engine import events as ev  # noqa: E402
from engine.agents import make_agent  # noqa: E402
from engine.config import load_config  # noqa: E402
from engine.journal import Journal, Step  # noqa: E402
from engine.loop import Engine  # noqa: E402
from engine.runs import RunSettings  # noqa: E402
from engine.state import RunState  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@pytest.mark.slow
async def test_a_two_slot_exploration_of_the_tiny_experiment_on_a_local_cluster(tmp_path):
    project = tmp_path / "project"
    for folder in ("models", "instructions"):
        shutil.copytree(REPO / folder, project / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    config = yaml.safe_load((HERE / "configs" / "tiny.yaml").read_text())
    config["exploration"].update(
        agent="heuristic", approval="auto", iterations=6, parallel=2,
        executor={"kind": "dask", "dask": {"scheduler": "local",
                                           "scratch": str(tmp_path / "scratch")}})
    (project / "configs").mkdir()
    config_path = project / "configs" / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    loaded = load_config(config_path)
    settings = RunSettings(name="d", config_path=str(config_path), iterations=6,
                           approval="auto", agent="heuristic", runner="zygote",
                           watch_edits=False)
    seen: list[ev.Event] = []
    engine = Engine.create(project, loaded, settings, make_agent("heuristic", loaded),
                           seen.append)
    try:
        finished = await engine.run()
    finally:
        engine.close()
    assert finished.reason == "completed 6 iterations"
    with Journal.open_for_client(engine.run_dir) as journal:
        assert journal.completed_iterations() == [1, 2, 3, 4, 5, 6]
        started = [e.iteration for e in journal.events() if e.step == Step.STARTED]
        assert started == [1, 2, 3, 4, 5, 6]
        placed = [e.payload for e in journal.events() if e.step == Step.RUN_STARTED]
        assert {p["slot"] for p in placed} == {1, 2}
        assert all(p["record"]["kind"] == "dask" for p in placed)
        assert len({p["record"]["worker"] for p in placed}) == 2  # both workers trained
        assert RunState(journal).active_runs == {}
    assert all(node.status == "done" for node in engine.tree)
    for node in engine.tree:  # the log streamed back and stayed on this machine
        log = engine.paths.training_log(node.id).read_text()
        assert "training on cpu" in log
        assert -1.0 < node.metrics["final_r2"] <= 1.0
    lines = [e for e in seen if isinstance(e, ev.LogLines)]
    assert {e.iteration for e in lines} == {1, 2, 3, 4, 5, 6}
    trainings = [e for e in seen if isinstance(e, ev.TrainingStarted)]
    assert all(e.where.startswith("dask worker ") and e.pid == 0 for e in trainings)


def _driver(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "loop_driver.py"), str(project), "r1",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_kill_9_with_two_runs_on_a_cluster_then_resume_cancels_and_reruns_them(tmp_path):
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    client = Client(cluster)
    engine = resumed = None
    journal = None
    try:
        project = make_git_project(tmp_path / "project")
        config_path = project / "configs" / "fake.yaml"
        config = yaml.safe_load(config_path.read_text())
        config["exploration"].update(parallel=2, executor={
            "kind": "dask", "dask": {"scheduler": cluster.scheduler_address,
                                     "scratch": str(tmp_path / "scratch")}})
        config["training"].update(steps=40, step_sleep=0.1)
        config_path.write_text(yaml.safe_dump(config))
        run_dir = project / "log" / "r1"
        engine = _driver(project, "4")
        wait_for(lambda: (run_dir / "vcs.yaml").exists(), "the run folder", 60)
        journal = Journal.open_for_client(run_dir)
        wait_for(lambda: len(RunState(journal).active_runs) == 2
                 and all("worker" in run["record"]
                         for run in RunState(journal).active_runs.values()),
                 "two runs placed on workers", 90)
        keys = {run["record"]["key"] for run in RunState(journal).active_runs.values()}
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        journal.close()
        journal = None

        def on_the_cluster() -> set[str]:
            return set(client.run_on_scheduler(
                lambda dask_scheduler: [str(key) for key in dask_scheduler.tasks]))

        # the scheduler drops the tasks of a client that went away, and their workers end
        # the runs; the resumed engine still reclaims each by its record before re-running
        wait_for(lambda: not keys & on_the_cluster(), "the dead engine's tasks to go", 60)
        resumed = _driver(project, "4", "resume")
        output, _ = resumed.communicate(timeout=240)
        assert resumed.returncode == 0, output.decode()
        assert not keys & on_the_cluster()  # cancelled, not left to finish
        journal = Journal.open_for_client(run_dir)
        assert journal.completed_iterations() == [1, 2, 3, 4]
        assert [e.iteration for e in journal.events() if e.step == Step.STARTED] == [1, 2, 3, 4]
        for iteration in (1, 2):  # re-run under its own number and recorded once
            recorded = [e for e in journal.events(iteration) if e.step == Step.RECORDED]
            assert len(recorded) == 1 and recorded[0].payload["node"]["status"] == "done"
        assert RunState(journal).active_runs == {}
    finally:
        if journal is not None:
            journal.close()
        for process in (engine, resumed):
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
        client.close()
        cluster.close()
