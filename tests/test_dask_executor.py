"""The Dask executor on a real `scheduler: local` cluster of two worker processes: runs of a
torch-free experiment whose train step prints lines at a pace the test sets, and one run of
the tiny embedded experiment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import pytest
import pytest_asyncio
import yaml
from distributed import Client

from engine.config import DaskSettings, Limits, Timeouts
from engine.evaluation import EvaluationPlan
from engine.executors import ExecutorError, NodeJob, Placement, dask_cluster
from engine.executors.dask_cluster import DaskExecutor
from engine.runner import RunResult, RunStatus

on_the_cluster = pytest.mark.asyncio(loop_scope="module")  # the tests share one cluster
ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-ant-fake-dask-executor-0123456789"

# The node's experiment: `train` prints `lines` lines, `pause_s` apart; the score is `value`.
HARNESS = '''
import argparse, json, os, sys, time
from pathlib import Path

import yaml
from distributed import Client


def report(metrics):
    with os.fdopen(3, "w") as channel:
        channel.write(json.dumps({"status": "ok", "metrics": metrics, "hyperparameters": {},
                                  "error": None}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    for name in ("--config", "--data", "--out", "--state", "--predictions", "--data-cache",
                 "--split", "--seed", "--device", "--train-seconds"):
        parser.add_argument(name)
    args = parser.parse_args()
    node = yaml.safe_load(Path(args.config).read_text())["node"]
    if args.step == "prepare":
        for part in ("train", "eval", "score"):
            (Path(args.split) / part).mkdir()
        record = {"config": {"experiment": "paced"}, "seed": int(args.seed)}
        (Path(args.split) / "prepared.json").write_text(json.dumps(record))
        report({})
    elif args.step == "train":
        for line in range(node["lines"]):
            print(f"{node['name']} line {line}", flush=True)
            time.sleep(node["pause_s"])
        (Path(args.out) / "state").write_text(str(node["value"]))
    elif args.step == "predict":
        (Path(args.out) / "value").write_text((Path(args.state) / "state").read_text())
    else:
        print(f"{node['name']} scored", flush=True)
        report({"final_r2": float((Path(args.predictions) / "value").read_text())})


sys.exit(main())
'''


def populate(folder: Path) -> None:
    (folder / "models").mkdir()
    (folder / "models" / "__init__.py").write_text("")
    (folder / "models" / "harness.py").write_text(HARNESS)


def node_job(tmp_path: Path, name: str, lines: int = 3, pause_s: float = 0.0,
             value: float = 0.5, iteration: int = 1, extra: str = "") -> NodeJob:
    config = yaml.safe_dump({"experiment": "paced", "node": {
        "name": name, "lines": lines, "pause_s": pause_s, "value": value}}) + extra
    return NodeJob(iteration, 1, populate, config, 0, tmp_path / name / "training.log")


@dataclass
class Watch:
    """What a run told its callbacks, with a condition to wait on."""

    lines: list[str] = field(default_factory=list)
    placements: list[Placement] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def output(self, batch: list[str]) -> None:
        self.lines.extend(batch)
        self.changed.set()

    def placed(self, placement: Placement) -> None:
        self.placements.append(placement)
        self.changed.set()

    def workers(self) -> list[str]:
        return [p.record["worker"] for p in self.placements]

    async def until(self, condition: Callable[[], object], what: str, timeout: float = 60):
        """Wait for `condition`, checked each time a callback fires."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not condition():
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1)


def start(executor: DaskExecutor, slot: int, job: NodeJob, watch: Watch
          ) -> asyncio.Task[RunResult]:
    return asyncio.ensure_future(executor.run(slot, job, on_output=watch.output,
                                              on_placed=watch.placed))


def plan(tmp: Path) -> EvaluationPlan:
    return EvaluationPlan(harness="models.harness", data_cache=tmp / "engine-side-cache",
                          timeouts=Timeouts(wall_s=300, no_output_s=120, kill_grace_s=1),
                          limits=Limits(memory_mb=None, processes=64))


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def executor(tmp_path_factory) -> AsyncIterator[DaskExecutor]:
    """Two slots on a local cluster started while a (fake) API key is in the environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
        patch.setenv("PROCTOR_TEST_SCRATCH", str(tmp_path_factory.mktemp("scratch")))
        made = DaskExecutor(2, plan(tmp_path_factory.mktemp("dask")),
                            DaskSettings(scheduler="local", retries=1), preload=("yaml",))
        await made.start()
        try:
            yield made
        finally:
            await made.aclose()


@contextlib.asynccontextmanager
async def another_run(executor: DaskExecutor, scratch: str | None = None, **changes: object
                      ) -> AsyncIterator[DaskExecutor]:
    """Another engine's executor on the same cluster (its scheduler's address), with a plan
    that has `changes`."""
    other = DaskExecutor(executor.slots, replace(executor.plan, **changes),
                         DaskSettings(scheduler=executor.address, scratch=scratch),
                         preload=executor.preload, security=executor.security)
    await other.start()
    try:
        yield other
    finally:
        await other.aclose()


def client_tls(executor: DaskExecutor) -> dict[str, str]:
    """The Dask config, as environment variables, of a client holding the local cluster's
    own certificate (the engine's key files, in its private folder)."""
    folder = Path(executor._logs)
    return {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(folder / "ca.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(folder / "worker.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(folder / "worker.key")}


async def worker_pids(executor: DaskExecutor) -> dict[str, int]:
    return await executor.client.run(os.getpid)


@on_the_cluster
async def test_two_slots_run_at_once_on_two_workers_and_their_logs_stream_back(
        executor, tmp_path):
    watches = {1: Watch(), 2: Watch()}
    jobs = {slot: node_job(tmp_path, f"node{slot}", lines=30, pause_s=0.1, value=0.25 * slot)
            for slot in (1, 2)}
    runs = {slot: start(executor, slot, jobs[slot], watches[slot]) for slot in (1, 2)}
    for slot in (1, 2):
        await watches[slot].until(lambda s=slot: watches[s].lines, f"slot {slot}'s first lines")
    # both stream before either has finished: they run at the same time
    assert not any(run.done() for run in runs.values())
    assert jobs[1].log_path.read_text().startswith("node1 line 0\n")  # appended as they came
    results = {slot: await run for slot, run in runs.items()}

    assert {results[1].metrics["final_r2"], results[2].metrics["final_r2"]} == {0.25, 0.5}
    workers = {slot: watches[slot].workers() for slot in (1, 2)}
    assert len(workers[1]) == len(workers[2]) == 1 and workers[1] != workers[2]
    for slot in (1, 2):
        assert results[slot].status is RunStatus.OK, results[slot].error
        [placed] = watches[slot].placements
        assert placed.record == {"kind": "dask", "scheduler": executor.address,
                                 "key": placed.record["key"], "worker": workers[slot][0]}
        assert placed.where == f"dask worker {workers[slot][0]}"
        assert placed.record["key"].startswith(f"proctor-{jobs[slot].iteration}.1-")
        log = jobs[slot].log_path.read_text()
        assert f"node{slot} line 29" in log and f"node{slot} scored" in log
        assert f"node{slot} scored" in watches[slot].lines  # the last lines are not dropped
    assert executor.describe(2) == f"dask slot 2 ({executor.address})"


@on_the_cluster
async def test_the_tiny_experiment_trains_on_a_worker_and_its_metrics_come_back(
        executor, tmp_path, tiny_config):
    def models(folder: Path) -> None:
        shutil.copytree(ROOT / "models", folder / "models",
                        ignore=shutil.ignore_patterns("__pycache__"))

    job = NodeJob(1, 1, models, tiny_config.read_text(), 0, tmp_path / "training.log")
    result = await executor.run(1, job)
    assert result.status is RunStatus.OK, (result.error, job.log_path.read_text()[-2000:])
    assert result.metrics["training_time_s"] > 0 and "final_r2" in result.metrics
    assert "[harness] score: status ok" in job.log_path.read_text()


@on_the_cluster
async def test_the_streamed_log_keeps_to_the_log_limit_on_the_engines_side(executor, tmp_path):
    job = node_job(tmp_path, "chatty", lines=400, pause_s=0.002)
    sizes = []

    def output(lines: list[str]) -> None:
        sizes.append(job.log_path.stat().st_size)

    limits = executor.plan.limits.model_copy(update={"log_mb": 2 / 1024})  # 2 KiB
    async with another_run(executor, limits=limits) as capped:
        result = await capped.run(1, job, on_output=output)
    assert result.status is RunStatus.OK and result.log_truncated
    assert len(sizes) > 1 and max(sizes) < 2 * 2048  # one batch past the limit at most
    log = job.log_path.read_text()  # the worker's: its head, a marker, its last lines
    assert "[proctor] log truncated" in log and "chatty line 200" not in log
    assert log.startswith("chatty line 0\n") and "chatty line 399" in log


@on_the_cluster
async def test_scratch_holds_each_workers_areas_and_one_data_cache(executor, tmp_path):
    async with another_run(executor, scratch="$PROCTOR_TEST_SCRATCH/runs") as scratched:
        results = await asyncio.gather(*(scratched.run(slot, node_job(tmp_path, f"s{slot}",
                                                                      lines=20, pause_s=0.05))
                                         for slot in (1, 2)))
    assert [result.status for result in results] == [RunStatus.OK] * 2
    runs = Path(os.environ["PROCTOR_TEST_SCRATCH"]) / "runs"  # the workers' value of it
    folders = sorted(path.name for path in runs.iterdir())
    assert "data-cache" in folders and len(folders) == 3  # and one folder per worker
    for folder in set(folders) - {"data-cache"}:
        assert (runs / folder / "area-0" / "split" / "prepared.json").exists()


@on_the_cluster
async def test_stop_ends_a_slots_run_stopped_and_the_slot_runs_again(executor, tmp_path):
    watch = Watch()
    run = start(executor, 1, node_job(tmp_path, "long", lines=2000, pause_s=0.05), watch)
    await watch.until(lambda: watch.lines, "the long run's first lines")
    await executor.stop(1)
    assert run.done()
    result = await run
    assert result.status is RunStatus.STOPPED and result.metrics == {}
    assert "long line 1999" not in watch.lines

    again = await executor.run(1, node_job(tmp_path, "after", value=0.75))
    assert again.status is RunStatus.OK and again.metrics["final_r2"] == 0.75


@on_the_cluster
async def test_a_queued_run_is_stopped_without_waiting_for_a_worker(executor, tmp_path):
    watches = [Watch() for _ in range(3)]
    runs = [start(executor, slot, node_job(tmp_path, f"busy{slot}", lines=2000, pause_s=0.05),
                  watches[slot - 1]) for slot in (1, 2)]
    for watch in watches[:2]:
        await watch.until(lambda w=watch: w.lines, "the busy runs' first lines")
    queued = start(executor, 3, node_job(tmp_path, "queued"), watches[2])
    await until_submitted(executor, 3)  # both workers are busy: it cannot start
    await executor.stop(3)
    result = await queued
    assert result.status is RunStatus.STOPPED and not watches[2].placements
    for slot in (1, 2):
        await executor.stop(slot)
    assert [(await run).status for run in runs] == [RunStatus.STOPPED] * 2


@on_the_cluster
async def test_reclaim_stops_and_cancels_a_task_by_its_record(executor, tmp_path):
    watch = Watch()
    run = start(executor, 1, node_job(tmp_path, "orphan", lines=2000, pause_s=0.05), watch)
    await watch.until(lambda: watch.lines, "the orphan's first lines")
    record = watch.placements[-1].record
    # a resumed engine: its own executor, connected to the scheduler the record names
    resumed = DaskExecutor(1, executor.plan, DaskSettings(scheduler=executor.address),
                           security=executor.security)
    await resumed.start()
    try:
        said = await resumed.reclaim(record)
    finally:
        await resumed.aclose()
    assert said == f"stopped Dask task {record['key']} on {record['worker']} and cancelled it"
    result = await asyncio.wait_for(run, 60)
    assert result.status in (RunStatus.STOPPED, RunStatus.LOST)
    assert "orphan line 1999" not in watch.lines
    await until_not_running(executor, record["key"])
    assert await executor.reclaim(record) is None  # nothing left to end


ABANDONING_ENGINE = """
import asyncio, json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from test_dask_executor import node_job, plan
from engine.config import DaskSettings
from engine.executors import dask_cluster
from engine.executors.dask_cluster import DaskExecutor

async def main():
    executor = DaskExecutor(1, plan(Path(sys.argv[3])), DaskSettings(scheduler=sys.argv[2]),
                            preload=("yaml",))
    await executor.start()

    def placed(placement):
        print(json.dumps(placement.record), flush=True)

    await executor.run(1, node_job(Path(sys.argv[3]), "abandoned", lines=2000, pause_s=0.05),
                       on_placed=placed)

asyncio.run(main())
"""


async def keys_running(executor: DaskExecutor) -> set[str]:
    running = await executor.client.run(
        lambda: sorted(dask_cluster._RUNTIME.running) if dask_cluster._RUNTIME else [])
    return {key for keys in running.values() for key in keys}


async def until_submitted(executor: DaskExecutor, tasks: int, timeout: float = 30) -> None:
    """Until the scheduler holds `tasks` tasks."""
    async with asyncio.timeout(timeout):
        while await executor.client.run_on_scheduler(
                lambda dask_scheduler: len(dask_scheduler.tasks)) < tasks:
            await asyncio.sleep(0.05)


async def until_not_running(executor: DaskExecutor, key: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while key in await keys_running(executor):
            await asyncio.sleep(0.1)


@on_the_cluster
async def test_the_run_of_a_killed_engine_ends_on_its_worker(executor, tmp_path):
    engine = subprocess.Popen(
        [sys.executable, "-c", ABANDONING_ENGINE, str(ROOT / "tests"), executor.address,
         str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, **client_tls(executor)})
    try:
        line = await asyncio.wait_for(asyncio.to_thread(engine.stdout.readline), 60)
        record = json.loads(line)
        assert record["key"] in await keys_running(executor)
    finally:
        engine.kill()
        engine.wait()
    await until_not_running(executor, record["key"])  # the client went, so its run goes
    assert await executor.reclaim(record) is None  # nothing was left to end


@on_the_cluster
async def test_reclaim_of_a_scheduler_that_is_gone_says_so(executor):
    record = {"kind": "dask", "scheduler": "tcp://127.0.0.1:9", "key": "proctor-4.1-00000000",
              "worker": "tcp://127.0.0.1:10"}
    said = await executor.reclaim(record)
    assert said is not None and "tcp://127.0.0.1:9" in said and "cannot be reached" in said
    assert await executor.reclaim({"kind": "local", "pid": 1}) is None


@on_the_cluster
async def test_no_secret_reaches_a_worker_process_or_what_it_starts(executor, tmp_path):
    result = await executor.run(1, node_job(tmp_path, "plain"))  # a zygote and runs exist now
    assert result.status is RunStatus.OK
    nannies = await executor.client.run(os.getpid, nanny=True)
    processes = [psutil.Process(pid) for pid in nannies.values()]
    processes += [child for nanny in list(processes) for child in nanny.children(recursive=True)]
    assert set((await worker_pids(executor)).values()) <= {p.pid for p in processes}
    assert len(processes) >= 4  # two nannies, two workers, and a zygote
    for process in processes:
        environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        assert FAKE_KEY.encode() not in environ and b"ANTHROPIC_API_KEY" not in environ


@on_the_cluster
async def test_a_node_that_holds_a_secret_is_not_sent(executor, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
    watch = Watch()
    job = node_job(tmp_path, "leaky", extra=f"# {FAKE_KEY}\n")
    result = await executor.run(1, job, on_output=watch.output, on_placed=watch.placed)
    assert result.status is RunStatus.FAILED and not watch.placements
    assert result.error == ("the node's files or config hold the value of ANTHROPIC_API_KEY: "
                            "not sent to the Dask cluster")


@on_the_cluster
async def test_a_node_whose_files_hold_the_key_of_the_key_file_is_not_sent(executor, tmp_path):
    key_file = tmp_path / "anthropic.key"
    key_file.write_text(f"\n{FAKE_KEY}\n")

    def leaky(folder: Path) -> None:
        populate(folder)
        (folder / "models" / "notes.txt").write_text(f"the key: {FAKE_KEY}")

    job = replace(node_job(tmp_path, "leaky"), populate=leaky)
    async with another_run(executor, hide=(key_file,)) as keyed:
        result = await keyed.run(1, job)
    assert result.status is RunStatus.FAILED
    assert result.error == (f"the node's files or config hold the value of the key in "
                            f"{key_file}: not sent to the Dask cluster")


@on_the_cluster
async def test_a_killed_worker_sends_the_run_again_then_it_is_lost(executor, tmp_path):
    watch = Watch()
    run = start(executor, 1, node_job(tmp_path, "doomed", lines=2000, pause_s=0.05), watch)
    killed = []
    for attempt in (1, 2):  # retries: 1, so the second loss is the last
        await watch.until(lambda a=attempt: len(watch.workers()) == a and not run.done(),
                          f"attempt {attempt} on a worker")
        worker = watch.workers()[-1]
        pid = (await executor.client.run(os.getpid, workers=[worker]))[worker]
        os.kill(pid, signal.SIGKILL)
        killed.append(worker)
    result = await asyncio.wait_for(run, 60)
    assert result.status is RunStatus.LOST
    assert result.error == f"the Dask worker {killed[1]} was lost (sent 2 times)"
    keys = [p.record["key"] for p in watch.placements]
    assert len(set(keys)) == 2  # sent again under a new key
    await executor.client.wait_for_workers(2, timeout=60)  # the nannies start new workers


@on_the_cluster
async def test_an_unreachable_scheduler_is_one_line(tmp_path):
    executor = DaskExecutor(1, plan(tmp_path), DaskSettings(scheduler="tcp://127.0.0.1:9",
                                                           connect_timeout_s=1))
    with pytest.raises(ExecutorError) as caught:
        await executor.start()
    message = str(caught.value)
    assert message.startswith("cannot reach the Dask scheduler tcp://127.0.0.1:9 within 1 s")
    assert "\n" not in message and executor.client is None


def test_without_dask_the_dask_executor_is_one_clear_line(tmp_path):
    script = (
        "import sys\n"
        "sys.modules['distributed'] = None\n"
        "from pathlib import Path\n"
        "from engine.config import ExperimentConfig\n"
        "from engine.executors import ExecutorError, make_executor\n"
        "from engine.runner import make_runner\n"
        "config = ExperimentConfig.model_validate(\n"
        "    {'exploration': {'executor': {'kind': 'dask', 'dask': {'scheduler': 'local'}}}})\n"
        "try:\n"
        "    make_executor(config, Path('.'), Path('sandbox'), make_runner)\n"
        "except ExecutorError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [line] = done.stdout.splitlines()
    assert "distributed" in line and line.endswith("pip install 'proctor[dask]'")


def test_the_engine_imports_no_dask_until_a_config_asks_for_it():
    script = ("import sys, engine.executors\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('dask', 'distributed', 'dask_jobqueue'))))")
    done = subprocess.run([sys.executable, "-c", "import json\n" + script], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []



@on_the_cluster
async def test_the_local_cluster_listens_on_loopback_and_takes_no_one_without_its_key(
        executor):
    """Another user of the machine must not reach the scheduler (it runs in the engine, with
    the API key in its environment) nor make a worker run anything."""
    assert executor.address.startswith("tls://127.0.0.1:")
    pids = await worker_pids(executor)
    workers = list(pids)
    assert len(workers) == 2 and all(a.startswith("tls://127.0.0.1:") for a in workers)
    for pid in pids.values():
        process = psutil.Process(pid)
        listening = [c.laddr.ip for proc in (process, process.parent())
                     for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        assert listening and set(listening) == {"127.0.0.1"}
    for address in (executor.address, executor.address.replace("tls://", "tcp://"),
                    *workers):
        with pytest.raises(Exception):  # noqa: B017 - refused however it is put
            await asyncio.wait_for(Client(address, asynchronous=True, timeout=3,
                                          set_as_default=False), 10)
