"""The Dask executor: each run of a node is one task on a `dask.distributed` cluster.

    dask: {scheduler: local}              `parallel` worker processes on this machine
    dask: {scheduler: tcp://host:8786}    the workers of an existing scheduler
    dask: {cluster: {system: slurm, ...}} a dask-jobqueue cluster proctor starts (jobqueue.py)

The engine's side (`DaskExecutor`) packs the node's files and config into the task, follows
the training log on one event topic while the task runs, notices when the worker running it
is lost and sends the run again. A worker's side (`run_node`) unpacks the files into its
scratch folder and runs the same sandboxed prepare -> train -> predict -> score steps as a
local run (`engine.evaluation.evaluate`), with a zygote runner kept for the life of the
worker process, and returns the result and the whole log.

No secret travels: the worker processes proctor starts (and the batch jobs it submits) get
an environment without any credential-like variable, and a node whose files or config hold
the value of one is not sent at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distributed import Client, Future, Scheduler, SpecCluster, get_worker
from distributed.comm.addressing import parse_address, parse_host_port
from distributed.core import Status
from distributed.deploy.subprocess import SubprocessWorker
from distributed.scheduler import KilledWorker
from distributed.security import Security

from engine.atomic import write_atomic
from engine.config import DaskSettings
from engine.evaluation import EvaluationPlan, evaluate
from engine.executors.base import Executor, ExecutorError, NodeJob, PlacedCallback, Placement
from engine.executors.local import visible_gpus
from engine.runner import OutputCallback, Runner, RunResult, RunStatus, make_runner
from engine.runner.isolation import environment_without_secrets, is_secret_name
from engine.runner.runner import SCRATCH_PREFIX
from engine.runner.zygote import DEFAULT_PRELOAD

TOPIC = "proctor-runs"  # one event topic for every run's messages: the scheduler keeps it bounded
_WATCH_S = 0.5  # how often a placed run's worker is checked
_LATE_LINES_S = 2.0  # how long the last streamed lines may trail the result
_LOCAL_START_S = 120.0  # a local worker that has not joined by then is a problem to report
_STOP_GRACE_S = 30.0  # beyond the run's own kill grace, before a stopped task is just cancelled
_RECLAIM_CONNECT_S = 10.0
_STREAM_LINES = 500  # per message; more in one batch are counted, not streamed (the log has them)
_STREAM_LINE_CHARS = 4000
_SECRET_MIN_CHARS = 8  # shorter values would match by chance


def _secret_values(source: Mapping[str, str] | None = None,
                   key_files: Iterable[Path] = ()) -> dict[str, str]:
    """The values of this process's credential-like variables and the keys in `key_files`,
    each with what it is called."""
    source = os.environ if source is None else source
    values = {value: name for name, value in source.items()
              if is_secret_name(name) and len(value) >= _SECRET_MIN_CHARS}
    for path in key_files:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            key = next((line.strip() for line in Path(path).read_text("utf-8").splitlines()
                        if line.strip()), "")
            if len(key) >= _SECRET_MIN_CHARS:
                values[key] = f"the key in {path}"
    return values


def secret_carried(*payloads: str | bytes, key_files: Iterable[Path] = ()) -> str | None:
    """What a secret found in one of `payloads` is called (a credential-like variable of this
    process, or the key in one of `key_files`); None when there is none."""
    for value, name in _secret_values(key_files=key_files).items():
        encoded = value.encode()
        for payload in payloads:
            if (encoded in payload) if isinstance(payload, bytes) else (value in payload):
                return name
    return None


# ----------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class NodeTask:
    """What travels to the worker: the node's files (a tar), its config, and how to run it.
    `threads`: the OMP/MKL threads of each step; None keeps the worker's own (a Dask nanny
    sets 1: `distributed.nanny.pre-spawn-environ` on the workers changes it)."""

    key: str
    plan: EvaluationPlan
    files: bytes
    config_text: str
    seed: int
    scratch: str | None = None
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    threads: int | None = None
    runner: str = "zygote"  # exploration.runner: zygote, or a fresh subprocess per step


def pack(populate: Callable[[Path], None]) -> bytes:
    """The node's experiment package, as `populate` writes it, in one tar (uncompressed: a
    few small files, and what travels can be searched for secrets)."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="proctor-pack-") as folder:
        populate(Path(folder))
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for entry in sorted(Path(folder).iterdir()):
                archive.add(entry, arcname=entry.name)
    return buffer.getvalue()


def unpack(files: bytes, folder: Path) -> None:
    """Write a packed node into `folder` (the data filter refuses links out and odd modes)."""
    with tarfile.open(fileobj=io.BytesIO(files), mode="r:") as archive:
        archive.extractall(folder, filter="data")


# ----------------------------------------------------------------------------- a worker's side

_STOPS: deque[str] = deque(maxlen=1000)  # keys whose runs were asked to stop on this worker
_RUNTIME: _WorkerRuntime | None = None
_RUNTIME_LOCK = threading.Lock()


def run_node(task: NodeTask) -> dict[str, Any]:
    """On a Dask worker: run one node and return its result, its log and what was streamed."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = _WorkerRuntime()
    return _RUNTIME.run(get_worker(), task)


def stop_key(key: str) -> bool:
    """On a Dask worker (through `Client.run`): stop the run of task `key`, now or when it
    starts here; True when it was running here."""
    _STOPS.append(key)
    return _RUNTIME is not None and key in _RUNTIME.running


class _WorkerRuntime:
    """One per worker process: an event loop thread for the runners, and a zygote runner per
    run going at once, kept from run to run so torch is imported once per worker."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proctor-runs",
                                       daemon=True)
        self.thread.start()
        self.running: dict[str, Runner] = {}
        self._idle: dict[tuple[str, tuple[str, ...]], list[tuple[int, Runner]]] = {}
        self._made = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _lease(self, mode: str, preload: tuple[str, ...]) -> Iterator[tuple[int, Runner]]:
        with self._lock:
            idle = self._idle.setdefault((mode, preload), [])
            if idle:
                leased = idle.pop()
            else:
                runner = make_runner("subprocess") if mode == "subprocess" else \
                    make_runner("zygote", preload=preload)
                leased = (self._made, runner)
                self._made += 1
        try:
            yield leased
        finally:
            with self._lock:
                self._idle[mode, preload].append(leased)

    def run(self, worker: Any, task: NodeTask) -> dict[str, Any]:
        stream = _Stream(worker, task.key)
        stream.send(kind="started", worker=worker.address)
        if task.key in _STOPS:
            return _payload(_stopped("stopped before it started"), b"", stream, worker)
        with self._lease(task.runner, task.preload) as (index, runner):
            folder, cache = _scratch(task, worker)
            area, log = folder / f"area-{index}", folder / "logs" / f"{task.key}.log"
            for made in (area, log.parent, cache):
                made.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(OSError):  # a shared cache may be another user's
                    made.chmod(0o755)  # an untrusted step runs as another uid when we are root
            env = dict(task.plan.env)
            if task.threads:
                env.update(OMP_NUM_THREADS=str(task.threads), MKL_NUM_THREADS=str(task.threads))
            plan = replace(task.plan, data_cache=cache, env=env)
            evaluation = evaluate(runner, plan, area, lambda to: unpack(task.files, to),
                                  task.config_text, log, seed=task.seed, on_output=stream.lines)
            self.running[task.key] = runner
            try:
                result = self._wait(asyncio.run_coroutine_threadsafe(evaluation, self.loop),
                                    worker, task.key, runner)
            finally:
                del self.running[task.key]
            try:
                text = log.read_bytes()
            except OSError:
                text = b""
            log.unlink(missing_ok=True)
        return _payload(result, text, stream, worker)

    def _wait(self, future: concurrent.futures.Future[RunResult], worker: Any, key: str,
              runner: Runner) -> RunResult:
        """The run's result; while it goes, stop it once it is asked to stop, its task was
        cancelled (the engine stopped it or went away) or this worker is closing."""
        while True:
            try:
                return future.result(timeout=0.25)
            except concurrent.futures.TimeoutError:
                if _should_stop(worker, key):
                    # again at each look: a step that starts after a stop is stopped too
                    asyncio.run_coroutine_threadsafe(runner.stop_current(), self.loop)


def _should_stop(worker: Any, key: str) -> bool:
    if key in _STOPS:
        return True
    task = worker.state.tasks.get(key)
    if task is None or task.state == "cancelled":
        return True
    return worker.status not in (Status.running, Status.paused)


def _scratch(task: NodeTask, worker: Any) -> tuple[Path, Path]:
    """This worker's folder for run areas and logs, and the simulated-data cache: under
    `dask.scratch` (shared by the workers of a host, each in its own folder; $VARIABLES such
    as $USER or $SLURM_TMPDIR are the worker's) or else in the worker's local directory."""
    if task.scratch:
        root = Path(os.path.expandvars(task.scratch)).expanduser()
        own = re.sub(r"[^\w.-]", "_", f"{socket.gethostname()}-{worker.name}")
        return root / own, root / "data-cache"
    root = Path(worker.local_directory) / "proctor"
    return root, root / "data-cache"


class _Stream:
    """Sends a run's messages (its start, batches of log lines) on the event topic."""

    def __init__(self, worker: Any, key: str) -> None:
        self.worker, self.key = worker, key
        self.sent = 0  # log messages, so the engine knows when it has them all

    def send(self, **message: Any) -> None:
        self.worker.log_event(TOPIC, {"key": self.key, **message})

    def lines(self, batch: list[str]) -> None:
        shown = [line[:_STREAM_LINE_CHARS] for line in batch[:_STREAM_LINES]]
        if len(batch) > len(shown):
            shown.append(f"[proctor: {len(batch) - len(shown)} more lines in training.log]")
        self.sent += 1
        self.send(kind="lines", lines=shown)


def _payload(result: RunResult, log: bytes, stream: _Stream, worker: Any) -> dict[str, Any]:
    return {"result": result.to_dict(), "log": log, "messages": stream.sent,
            "worker": worker.address}


def _stopped(why: str) -> RunResult:
    return _result(RunStatus.STOPPED, why)


def _result(status: RunStatus, error: str, warnings: tuple[str, ...] = ()) -> RunResult:
    return RunResult(status=status, exit_code=None, signal=None, metrics={}, hyperparameters={},
                     error=error, traceback_tail="", wall_s=0.0, peak_rss_mb=None,
                     log_truncated=False, warnings=warnings)


# ----------------------------------------------------------------------------- the engine's side


def quiet_dask() -> None:
    """Keep Dask's logging (and tornado's reports of its failed callbacks, e.g. a refused
    job submission) off the engine's terminal for the rest of the process: what matters
    reaches a run's result, and a closing cluster's last complaints come after the run's
    final line."""
    tornado = logging.getLogger("tornado.application")
    if _drop not in tornado.filters:
        tornado.addFilter(_drop)
    for handler in logging.getLogger("distributed").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.CRITICAL)


def _drop(record: logging.LogRecord) -> bool:
    return False


class _SecretFreeWorker(SubprocessWorker):
    """A worker (a nanny and its worker process) started as a subprocess whose environment
    holds no secret: an in-process nanny would spawn workers from ours."""

    def __init__(self, scheduler: str, name: str | None = None,
                 worker_kwargs: dict | None = None, env: dict[str, str] | None = None,
                 log_folder: str | None = None) -> None:
        super().__init__(scheduler, name=name, worker_kwargs=worker_kwargs)
        self.env = {**environment_without_secrets(), **(env or {})}
        self.log_folder = log_folder

    async def _start(self) -> None:
        spec = {"cls": self.worker_class, "opts": {**self.worker_kwargs, "name": self.name}}
        log = open(os.devnull, "wb") if self.log_folder is None else \
            open(Path(self.log_folder) / f"{self.name}.log", "ab")  # noqa: SIM115
        with log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "distributed.cli.dask_spec", self.scheduler,
                "--spec", json.dumps(spec), env=self.env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)


def local_cluster_spec(slots: int, log_folder: str, security: Security,
                       gpus: list[str] | None = None) -> tuple[dict, dict]:
    """The scheduler (in this process) and `slots` one-thread workers of `scheduler: local`,
    all on loopback and speaking mutual TLS with the run's own certificate (`local_security`):
    another user of the machine can neither connect nor make them run anything. On a
    machine with several GPUs each worker sees its own."""
    gpus = visible_gpus() if gpus is None else gpus
    # its HTTP server (health, metrics) on a free port: two runs on one box must not collide
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0,
                                               "protocol": "tls://", "security": security,
                                               "dashboard": False,
                                               "dashboard_address": "127.0.0.1:0"}}
    tls = _tls_environment(security, Path(log_folder))
    workers = {}
    for index in range(slots):
        env = {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} if gpus and slots > 1 else {}
        workers[f"proctor-{index + 1}"] = {"cls": _SecretFreeWorker, "options": {
            "worker_kwargs": {"nthreads": 1, "memory_limit": 0, "death_timeout": 30,
                              "host": "127.0.0.1", "protocol": "tls://",
                              "dashboard_address": "127.0.0.1:0"},
            "env": {**tls, **env}, "log_folder": log_folder}}
    return scheduler, workers


def _tls_environment(security: Security, folder: Path) -> dict[str, str]:
    """The Dask config, as environment variables, that gives a worker subprocess the run's
    certificate: PEM files in the run's private (0700) folder, readable by this user only."""
    files = {"ca.pem": security.tls_ca_file, "worker.pem": security.tls_worker_cert,
             "worker.key": security.tls_worker_key}
    for name, text in files.items():
        path = folder / name
        path.touch(mode=0o600)
        path.write_text(text, encoding="utf-8")
    return {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(folder / "ca.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT": str(folder / "worker.pem"),
            "DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY": str(folder / "worker.key")}


@dataclass
class _Attempt:
    """One submission of a slot's run, as the engine follows it."""

    key: str
    job: NodeJob
    on_output: OutputCallback | None
    log_room: int  # bytes the streamed log may still take here (the worker's log is capped too)
    worker: str | None = None
    lost: str | None = None  # why the run's worker is gone
    messages: int = 0  # log messages received
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def deliver(self, lines: list[str]) -> None:
        self.messages += 1
        text = "".join(line + "\n" for line in lines).encode("utf-8", "replace")
        if self.log_room > 0:
            self.log_room -= len(text)
            with contextlib.suppress(OSError), open(self.job.log_path, "ab") as log:
                log.write(text)
        if self.on_output is not None:
            try:
                self.on_output(lines)
            except Exception:  # a viewer's bug must not end a run; the log keeps the lines
                self.on_output = None
        self.changed.set()


@dataclass
class _SlotRun:
    """A slot's run across its attempts."""

    attempt: _Attempt | None = None
    stopping: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class DaskExecutor(Executor):
    """Runs each node as one task on a Dask cluster; `slots` runs in flight at once."""

    kind = "dask"

    def __init__(self, slots: int, plan: EvaluationPlan, settings: DaskSettings, *,
                 preload: tuple[str, ...] = DEFAULT_PRELOAD, runner: str = "zygote",
                 security: Security | None = None):
        super().__init__(slots)
        self.runner_mode = runner
        self.plan = plan
        self.settings = settings
        self.preload = tuple(preload)
        self.client: Client | None = None
        self.cluster: Any = None  # the cluster we started: LocalCluster-like or jobqueue
        self.address: str | None = None
        self._threads: int | None = None
        self._logs: str | None = None  # the local workers' own logs and TLS keys
        # how to reach a TLS scheduler (None: Dask's config); `scheduler: local` makes its own
        self.security = security
        self._runs: dict[int, _SlotRun] = {}
        self._attempts: dict[str, _Attempt] = {}

    # -- starting and closing
    async def start(self) -> None:
        quiet_dask()
        try:
            await self._start()
        except ExecutorError:
            await self._release()
            raise
        except Exception as exc:
            await self._release()
            raise ExecutorError(self._start_problem(exc)) from None

    async def _start(self) -> None:
        settings = self.settings
        if settings.cluster is not None:
            from engine.executors.jobqueue import start_cluster

            self.cluster = await start_cluster(settings.cluster)
            self._threads = settings.cluster.cores
            target: Any = self.cluster
        elif settings.scheduler == "local":
            # 0700, its keys too; named after this process, so a run's cleanup of scratch
            # left by killed engines removes it once this one is gone
            self._logs = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}dask-{os.getpid()}-")
            security = self.security = Security.temporary()
            scheduler, workers = local_cluster_spec(self.slots, self._logs, security)
            self.cluster = await SpecCluster(workers=workers, scheduler=scheduler,
                                             asynchronous=True, silence_logs=False,
                                             name="proctor", security=security)
            self._threads = max(1, (os.cpu_count() or 1) // self.slots)
            target = self.cluster
        elif settings.scheduler is not None:
            target = settings.scheduler
        else:
            raise ExecutorError("executor dask needs dask.scheduler (an address, or local) "
                                "or dask.cluster (slurm, lsf or pbs)")
        self.client = await Client(target, asynchronous=True, set_as_default=False,
                                   timeout=settings.connect_timeout_s,
                                   security=self.security)
        self.address = self.client.scheduler.address
        self.client.subscribe_topic(TOPIC, self._on_event)
        if settings.scheduler == "local":
            try:
                await self.client.wait_for_workers(self.slots, timeout=_LOCAL_START_S)
            except TimeoutError:
                kept, self._logs = self._logs, None  # for the person who reads the error
                raise ExecutorError(
                    f"the {self.slots} local Dask workers did not start within "
                    f"{_LOCAL_START_S:g} s; their logs are in {kept}") from None

    def _start_problem(self, exc: Exception) -> str:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if self.settings.cluster is not None:
            return f"cannot start the {self.settings.cluster.system} Dask cluster: {reason}"
        if self.settings.scheduler == "local":
            return f"cannot start the local Dask cluster: {reason}"
        return (f"cannot reach the Dask scheduler {self.settings.scheduler} within "
                f"{self.settings.connect_timeout_s:g} s: {reason}")

    async def aclose(self) -> None:
        await asyncio.gather(*(self.stop(slot) for slot in list(self._runs)))
        await self._release()

    async def _release(self) -> None:
        client, self.client = self.client, None
        cluster, self.cluster = self.cluster, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(TOPIC)
            with contextlib.suppress(Exception):
                await client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                await cluster.close()
        if self._logs is not None:
            shutil.rmtree(self._logs, ignore_errors=True)
            self._logs = None

    def describe(self, slot: int) -> str:
        return f"dask slot {slot}" + (f" ({self.address})" if self.address else "")

    # -- one run
    async def run(self, slot: int, job: NodeJob, *, on_output: OutputCallback | None = None,
                  on_placed: PlacedCallback | None = None) -> RunResult:
        if self.client is None:
            raise ExecutorError("the Dask executor was not started")
        files = pack(job.populate)
        carried = secret_carried(files, job.config_text, key_files=self.plan.hide)
        if carried is not None:
            return _result(RunStatus.FAILED, f"the node's files or config hold the value of "
                           f"{carried}: not sent to the Dask cluster")
        run = self._runs[slot] = _SlotRun()
        lost: list[str] = []
        try:
            while True:
                result, why = await self._attempt(slot, run, job, files, on_output, on_placed)
                if why is not None and run.stopping:
                    result, why = _stopped("stopped"), None
                if why is None:
                    break
                lost.append(why)
                if len(lost) > self.settings.retries:
                    sent = f" (sent {len(lost)} times)" if len(lost) > 1 else ""
                    result = _result(RunStatus.LOST, f"{why}{sent}")
                    break
            if lost and result.status is not RunStatus.LOST:
                result = replace(result, warnings=(
                    *result.warnings, *(f"sent again: {why}" for why in lost)))
            return result
        finally:
            run.done.set()
            del self._runs[slot]

    async def _attempt(self, slot: int, run: _SlotRun, job: NodeJob, files: bytes,
                       on_output: OutputCallback | None, on_placed: PlacedCallback | None,
                       ) -> tuple[RunResult, str | None]:
        """One submission: the result, and why the worker was lost if it was."""
        assert self.client is not None
        key = f"proctor-{job.iteration}.{job.attempt}-{secrets.token_hex(4)}"
        task = NodeTask(key, self.plan, files, job.config_text, job.seed, self.settings.scratch,
                        self.preload, self._threads, self.runner_mode)
        attempt = run.attempt = self._attempts[key] = _Attempt(
            key, job, on_output, int(self.plan.limits.log_mb * 2**20))
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        job.log_path.write_bytes(b"")  # the log of this attempt only
        # Placed once it starts on a worker; until then a killed engine's client takes its
        # queued task with it (the scheduler forgets what no client wants).
        future = self.client.submit(run_node, task, key=key, pure=False, retries=0)
        try:
            return await self._follow(slot, run, attempt, future, on_placed)
        finally:
            del self._attempts[key]
            if not future.done():
                with contextlib.suppress(Exception):
                    await future.cancel()

    async def _follow(self, slot: int, run: _SlotRun, attempt: _Attempt, future: Any,
                      on_placed: PlacedCallback | None) -> tuple[RunResult, str | None]:
        ended = asyncio.ensure_future(future.exception())
        placed: str | None = None
        stop_deadline: float | None = None
        loop = asyncio.get_running_loop()
        def note_placement() -> str | None:  # once it has started on a worker
            if attempt.worker is not None and attempt.worker != placed and on_placed is not None:
                on_placed(self._placement(slot, attempt.key, attempt.worker))
            return attempt.worker

        try:
            while not ended.done():
                attempt.changed.clear()
                placed = note_placement()
                if placed is None and (failed := await self._cannot_start_workers()):
                    return _result(RunStatus.LOST, failed), None  # sending again would not help
                if run.stopping:
                    if placed is None:  # still queued: cancelling it is enough
                        return _stopped("stopped"), None
                    if stop_deadline is None:  # the worker stops it and sends its result
                        stop_deadline = (loop.time() + self.plan.timeouts.kill_grace_s
                                         + _STOP_GRACE_S)
                        await self._signal_stop(attempt.key, placed)
                    elif loop.time() > stop_deadline:
                        return _stopped("stopped (the worker did not answer)"), None
                if attempt.lost is None and placed is not None and not await self._alive(placed):
                    attempt.lost = f"the Dask worker {placed} was lost"
                if attempt.lost is not None:
                    return _result(RunStatus.LOST, attempt.lost), attempt.lost
                changed = asyncio.ensure_future(attempt.changed.wait())
                await asyncio.wait({ended, changed}, timeout=_WATCH_S,
                                   return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
            note_placement()  # a task that ended at once was placed too
        finally:
            ended.cancel()
        return await self._outcome(run, attempt, future, ended.result())

    async def _outcome(self, run: _SlotRun, attempt: _Attempt, future: Any,
                       error: BaseException | None) -> tuple[RunResult, str | None]:
        if future.status == "cancelled":
            if run.stopping:
                return _stopped("stopped"), None
            # by someone else (an operator, a resumed engine): not sent again to fight them
            return _result(RunStatus.LOST, f"the Dask task {attempt.key} was cancelled on "
                           "the cluster"), None
        if isinstance(error, KilledWorker):
            why = f"Dask gave up on the task: the workers running it were lost ({error})"
            return _result(RunStatus.LOST, why), why
        if error is not None:
            line = (str(error).strip().splitlines() or [""])[0]
            return _result(RunStatus.FAILED, f"the Dask task failed: "
                           f"{type(error).__name__}: {line}"), None
        try:
            payload = await future.result()
        except Exception as exc:  # finished, then its worker went before the result came
            why = f"the result of Dask task {attempt.key} was lost ({type(exc).__name__})"
            return _result(RunStatus.LOST, why), why
        await self._catch_up(attempt, payload["messages"])
        with contextlib.suppress(OSError):
            write_atomic(attempt.job.log_path, payload["log"], durable=False)
        return RunResult.from_dict(payload["result"]), None

    async def _catch_up(self, attempt: _Attempt, messages: int) -> None:
        """Wait a little for the last log lines, which travel apart from the result."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_LATE_LINES_S):
                while attempt.messages < messages:
                    attempt.changed.clear()
                    await attempt.changed.wait()

    def _on_event(self, event: tuple[float, Any]) -> None:
        """A message of a run's task (on the client's loop): its start or log lines."""
        _, message = event
        attempt = self._attempts.get(message.get("key")) if isinstance(message, dict) else None
        if attempt is None:
            return
        if message.get("kind") == "lines":
            attempt.deliver([str(line) for line in message.get("lines", ())])
        elif message.get("kind") == "started":
            worker = str(message.get("worker"))
            if attempt.worker is None:
                attempt.worker = worker
            elif attempt.lost is None:  # Dask started it again elsewhere: its worker left
                attempt.lost = f"the Dask worker {attempt.worker} was lost"
            attempt.changed.set()

    async def _cannot_start_workers(self) -> str | None:
        """Why the batch cluster we started cannot start a worker, while it has none."""
        failures = getattr(self.cluster, "submit_failures", None)
        if not failures or self.client is None or self.settings.cluster is None:
            return None
        try:
            if await self.client.scheduler.ncores():
                return None
        except Exception:
            return None  # the scheduler did not answer this time: ask again later
        return next((f"the {self.settings.cluster.system} cluster cannot start a Dask worker: "
                     f"{line}" for line in failures[-1:]), None)

    async def _alive(self, worker: str) -> bool:
        assert self.client is not None
        try:
            return worker in await self.client.scheduler.ncores(workers=[worker])
        except Exception:
            return True  # the scheduler did not answer this time: ask again later

    async def _signal_stop(self, key: str, worker: str) -> None:
        """Ask the worker running `key` to stop it (it sends the STOPPED result back)."""
        assert self.client is not None
        with contextlib.suppress(Exception):  # a worker that is gone: the watch notices
            await self.client.run(stop_key, key, workers=[worker], on_error="ignore")

    def _placement(self, slot: int, key: str, worker: str) -> Placement:
        return Placement(slot, f"dask worker {worker}", {
            "kind": self.kind, "scheduler": self.address, "key": key, "worker": worker})

    async def stop(self, slot: int) -> None:
        run = self._runs.get(slot)
        if run is None:
            return
        run.stopping = True
        if run.attempt is not None:
            run.attempt.changed.set()
        await run.done.wait()

    async def reclaim(self, record: dict[str, Any]) -> str | None:
        key, scheduler = record.get("key"), record.get("scheduler")
        if record.get("kind") != self.kind or not isinstance(key, str) or not scheduler:
            return None
        own = self.client is not None and scheduler == self.address
        try:
            if not own and await _refused(scheduler):
                raise ConnectionRefusedError(scheduler)
            client = self.client if own else await Client(
                scheduler, asynchronous=True, set_as_default=False, security=self.security,
                timeout=min(self.settings.connect_timeout_s, _RECLAIM_CONNECT_S))
        except Exception:
            return (f"the Dask scheduler {scheduler} of task {key} cannot be reached (it may "
                    "have ended with the engine that started it): nothing to cancel")
        assert client is not None
        try:
            answers = await client.run(stop_key, key, on_error="ignore")
            with contextlib.suppress(Exception):
                await client.cancel([Future(key, client=client)], force=True)
        finally:
            if not own:
                with contextlib.suppress(Exception):
                    await client.close()
        running = sorted(address for address, was in answers.items() if was is True)
        if not running:
            return None
        return f"stopped Dask task {key} on {', '.join(running)} and cancelled it"


async def _refused(address: str) -> bool:
    """Whether nothing listens at a tcp/tls scheduler address (answered at once, where a
    Dask connection would retry until its timeout)."""
    try:
        host, port = parse_host_port(parse_address(address)[1])
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
    except (ConnectionRefusedError, socket.gaierror):
        return True
    except (OSError, ValueError, TimeoutError):
        return False
    writer.close()
    return False
